//! A loopback HTTP artifact mirror with fault injection.
