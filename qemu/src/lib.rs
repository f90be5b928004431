//! QEMU glue.
