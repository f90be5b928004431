//! Finding the daemon binary and checking it is a static x86-64 ELF executable: the bundle
//! runs on a node whose libc kiln does not control, so a dynamically linked daemon is refused.

use anyhow::{Context, Result};
use std::path::Path;

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;

/// Why an ELF is not acceptable as the daemon.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF executable")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 ELF")]
    WrongArch,
    #[error("truncated or malformed ELF")]
    Malformed,
    #[error("dynamically linked (has a PT_INTERP program interpreter); build the daemon static")]
    Dynamic,
}

/// Accepts a static x86-64 ELF (static-pie included: it has PT_DYNAMIC but no interpreter).
pub fn check_static(bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS=2 (64-bit), EI_DATA=1 (LE), e_machine=62 (x86-64)
    if bytes[4] != 2 || bytes[5] != 1 || u16le(bytes, 18) != 62 {
        return Err(ElfError::WrongArch);
    }
    let phoff = u64le(bytes, 32) as usize;
    let phentsize = u16le(bytes, 54) as usize;
    let phnum = u16le(bytes, 56) as usize;
    if phentsize < 56 || phnum == 0 {
        return Err(ElfError::Malformed);
    }
    let end = phoff
        .checked_add(phentsize.checked_mul(phnum).ok_or(ElfError::Malformed)?)
        .ok_or(ElfError::Malformed)?;
    if end > bytes.len() {
        return Err(ElfError::Malformed);
    }
    let mut _dynamic = false;
    for i in 0..phnum {
        let p_type = u32le(bytes, phoff + i * phentsize);
        if p_type == PT_INTERP {
            return Err(ElfError::Dynamic);
        }
        _dynamic |= p_type == PT_DYNAMIC;
    }
    Ok(())
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A readable static ELF at `p`.
pub fn is_static_file(p: &Path) -> bool {
    p.is_file()
        && std::fs::read(p)
            .map(|b| check_static(&b).is_ok())
            .unwrap_or(false)
}

/// Reads and checks the daemon binary.
pub fn load_daemon(path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read daemon {}", path.display()))?;
    check_static(&bytes).with_context(|| format!("refusing daemon {}", path.display()))?;
    Ok(bytes)
}

/// A minimal valid static x86-64 ELF (header + one PT_LOAD running `exit(0)`), for tests and
/// examples that must not depend on the real daemon build.
pub fn tiny_static_elf() -> Vec<u8> {
    let mut b = vec![0u8; 120];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little endian
    b[6] = 1; // version
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    let entry = 0x400000u64 + 120;
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
                                                    // PT_LOAD, R+X, whole file at 0x400000
    b[64..68].copy_from_slice(&1u32.to_le_bytes());
    b[68..72].copy_from_slice(&5u32.to_le_bytes());
    b[80..88].copy_from_slice(&0x400000u64.to_le_bytes());
    b[88..96].copy_from_slice(&0x400000u64.to_le_bytes());
    // mov edi,0 ; mov eax,60 ; syscall
    let code = [0xbf, 0, 0, 0, 0, 0xb8, 60, 0, 0, 0, 0x0f, 0x05];
    b.extend_from_slice(&code);
    let size = b.len() as u64;
    b[96..104].copy_from_slice(&size.to_le_bytes());
    b[104..112].copy_from_slice(&size.to_le_bytes());
    b[112..120].copy_from_slice(&0x1000u64.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_elf_is_static_and_an_interp_makes_it_dynamic() {
        let mut elf = tiny_static_elf();
        assert_eq!(check_static(&elf), Ok(()));
        elf[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(check_static(&elf), Err(ElfError::Dynamic));
        assert_eq!(check_static(b"#!/bin/sh\n"), Err(ElfError::NotElf));
    }

    #[test]
    fn the_test_host_kiln_binary_is_dynamic() {
        // cargo test binaries are ordinary dynamically linked executables on glibc hosts.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(check_static(&me), Err(ElfError::Dynamic));
    }
}
