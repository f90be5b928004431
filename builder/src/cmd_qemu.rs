//! `kiln qemu`: boot a profile's payload in a local VM.
