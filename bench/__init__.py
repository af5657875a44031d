"""The load benchmark (`make bench`): fake upstreams, reference pass-throughs, wrk, profiles."""
