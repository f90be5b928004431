//! QEMU glue: base images, accelerator probe, VM runner with QMP, serial-console timeline,
//! guest disk reader, and the harness behind `kiln qemu` and the end-to-end tests.
pub mod accel;
pub mod harness;
pub mod image;
pub mod inspect;
pub mod mirror;
pub mod qmp;
pub mod serial;
pub mod vm;
