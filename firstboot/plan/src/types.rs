//! Typed values that are parsed once, at the edge, and trusted everywhere after.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid sha256 {0:?}: expected 64 lowercase hex digits")]
    Sha256(String),
    #[error(
        "invalid version {0:?}: expected v<major>.<minor>.<patch>[-pre][+build], e.g. v1.32.4+k3s1"
    )]
    Version(String),
    #[error("invalid sha512 {0:?}: expected 128 lowercase hex digits")]
    Sha512(String),
    #[error(
        "invalid digest {0:?}: expected sha256:<64 lowercase hex> or sha512:<128 lowercase hex>"
    )]
    Digest(String),
}

/// A sha256 digest: exactly 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Sha256(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Digest of a byte slice.
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Sha256 {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let ok = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(ParseError::Sha256(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseError::Sha256(s.to_string()))?;
        Ok(Sha256(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}
impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A sha512 digest: exactly 128 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha512([u8; 64]);

impl Sha512 {
    pub fn from_bytes(bytes: [u8; 64]) -> Self {
        Sha512(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha512(sha2::Sha512::digest(data).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Sha512 {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut out = [0u8; 64];
        if !is_lower_hex(s, 128) || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(ParseError::Sha512(s.to_string()));
        }
        Ok(Sha512(out))
    }
}

impl fmt::Display for Sha512 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Sha512 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha512({})", self.to_hex())
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A content digest as a pin writes it, Ignition-style: `sha256:<hex>` or `sha512:<hex>`.
/// The algorithm is always explicit, so a 64-digit sha512 prefix can never pass for a sha256.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Digest {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Digest {
    pub fn algorithm(&self) -> &'static str {
        match self {
            Digest::Sha256(_) => "sha256",
            Digest::Sha512(_) => "sha512",
        }
    }
    pub fn to_hex(&self) -> String {
        match self {
            Digest::Sha256(h) => h.to_hex(),
            Digest::Sha512(h) => h.to_hex(),
        }
    }
    /// The all-zero value templates use as "fill me in": never a real digest.
    pub fn is_all_zero(&self) -> bool {
        match self {
            Digest::Sha256(h) => h.as_bytes().iter().all(|b| *b == 0),
            Digest::Sha512(h) => h.as_bytes().iter().all(|b| *b == 0),
        }
    }
    /// Does this digest hold for bytes with these hashes?
    pub fn matches(&self, h: &Hashes) -> bool {
        match self {
            Digest::Sha256(d) => *d == h.sha256,
            Digest::Sha512(d) => *d == h.sha512,
        }
    }
    /// The same algorithm's digest of the bytes `h` describes.
    pub fn of(&self, h: &Hashes) -> Digest {
        match self {
            Digest::Sha256(_) => Digest::Sha256(h.sha256),
            Digest::Sha512(_) => Digest::Sha512(h.sha512),
        }
    }
}

impl From<Sha256> for Digest {
    fn from(h: Sha256) -> Self {
        Digest::Sha256(h)
    }
}
impl From<Sha512> for Digest {
    fn from(h: Sha512) -> Self {
        Digest::Sha512(h)
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::Digest(s.to_string());
        match s.split_once(':') {
            Some(("sha256", hex)) => hex.parse().map(Digest::Sha256).map_err(|_| err()),
            Some(("sha512", hex)) => hex.parse().map(Digest::Sha512).map_err(|_| err()),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm(), self.to_hex())
    }
}
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}
impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A pinned download: its digest and, optionally, its exact length in bytes (a longer stream
/// is refused as soon as it passes the length, before it is all read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Pin {
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl Pin {
    pub fn new(digest: impl Into<Digest>, size: Option<u64>) -> Pin {
        Pin {
            digest: digest.into(),
            size,
        }
    }
    /// Do bytes with these hashes satisfy the pin (digest and, when pinned, length)?
    pub fn matches(&self, h: &Hashes) -> bool {
        self.digest.matches(h) && self.size.is_none_or(|n| n == h.size)
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.size {
            Some(n) => write!(f, "{} ({n} bytes)", self.digest),
            None => write!(f, "{}", self.digest),
        }
    }
}

/// Every digest a pin may name, of one byte stream, computed in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashes {
    pub sha256: Sha256,
    pub sha512: Sha512,
    pub size: u64,
}

impl Hashes {
    pub fn of(data: &[u8]) -> Hashes {
        let mut h = Hasher::default();
        h.update(data);
        h.finish()
    }
}

/// Streams bytes into sha256 and sha512 at once (both are needed when a sha512 pin must also
/// agree with a published sha256, as K3s's release sums are).
#[derive(Clone, Default)]
pub struct Hasher {
    sha256: sha2::Sha256,
    sha512: sha2::Sha512,
    size: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        self.sha256.update(data);
        self.sha512.update(data);
        self.size += data.len() as u64;
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn finish(self) -> Hashes {
        use sha2::Digest;
        Hashes {
            sha256: Sha256(self.sha256.finalize().into()),
            sha512: Sha512(self.sha512.finalize().into()),
            size: self.size,
        }
    }
}

/// A release version as upstream tags it: `v1.32.4+k3s1`, `v1.102.3`, `v3.4.7`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// Pre-release part after `-`, if any.
    pub pre: Option<String>,
    /// Build metadata after `+`, if any (`k3s1`).
    pub build: Option<String>,
}

impl Version {
    /// The tag as written upstream, with the leading `v`.
    pub fn tag(&self) -> String {
        self.to_string()
    }
    /// Without the leading `v` (Tailscale's tarball and chart names use this form).
    pub fn bare(&self) -> String {
        self.to_string()[1..].to_string()
    }
    /// The tag with `+` escaped for use in a URL path (`v1.32.4%2Bk3s1`).
    pub fn url_tag(&self) -> String {
        self.tag().replace('+', "%2B")
    }
}

impl FromStr for Version {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::Version(s.to_string());
        let rest = s.strip_prefix('v').ok_or_else(err)?;
        let (rest, build) = match rest.split_once('+') {
            Some((a, b)) => (a, Some(b.to_string())),
            None => (rest, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((a, b)) => (a, Some(b.to_string())),
            None => (rest, None),
        };
        let ident_ok = |x: &Option<String>| {
            x.as_deref().is_none_or(|v| {
                !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            })
        };
        if !ident_ok(&pre) || !ident_ok(&build) {
            return Err(err());
        }
        let mut parts = core.split('.');
        let mut num = || -> Result<u64, ParseError> {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let (major, minor, patch) = (num()?, num()?, num()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Version {
            major,
            minor,
            patch,
            pre,
            build,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(p) = &self.pre {
            write!(f, "-{p}")?;
        }
        if let Some(b) = &self.build {
            write!(f, "+{b}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({self})")
    }
}
impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret value in memory. Debug and Display never show it; there is deliberately no
/// Serialize, so it cannot end up in the plan, the journal, status or build.json by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value: call sites that need it are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_accepts_only_64_lowercase_hex() {
        let ok = "a".repeat(64);
        assert_eq!(ok.parse::<Sha256>().unwrap().to_hex(), ok);
        assert!("A".repeat(64).parse::<Sha256>().is_err());
        assert!("a".repeat(63).parse::<Sha256>().is_err());
        assert!("g".repeat(64).parse::<Sha256>().is_err());
    }

    #[test]
    fn digest_names_its_algorithm_and_checks_the_length_for_it() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.to_string(), format!("sha256:{}", "a".repeat(64)));
        let d: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert!(d.is_all_zero());
        for bad in [
            "a".repeat(64),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(128)),
            format!("SHA256:{}", "a".repeat(64)),
            format!("md5:{}", "a".repeat(32)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn pin_checks_digest_and_size() {
        let h = Hashes::of(b"hello");
        assert_eq!(h.sha256, Sha256::digest(b"hello"));
        assert_eq!(h.sha512, Sha512::digest(b"hello"));
        assert!(Pin::new(h.sha512, Some(5)).matches(&h));
        assert!(Pin::new(h.sha256, None).matches(&h));
        assert!(!Pin::new(h.sha512, Some(6)).matches(&h));
        assert!(!Pin::new(Sha512::digest(b"other"), Some(5)).matches(&h));
    }

    #[test]
    fn version_round_trips_k3s_style_tags() {
        let v: Version = "v1.32.4+k3s1".parse().unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 32, 4));
        assert_eq!(v.build.as_deref(), Some("k3s1"));
        assert_eq!(v.to_string(), "v1.32.4+k3s1");
        assert_eq!(v.url_tag(), "v1.32.4%2Bk3s1");
        assert_eq!("v1.102.3".parse::<Version>().unwrap().bare(), "1.102.3");
        for bad in [
            "1.2.3", "v1.2", "v1.2.3.4", "v01.2.3", "v1.2.3+", "v1.2.x", "latest",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("tskey-canary");
        assert!(!format!("{s:?} {s}").contains("canary"));
        assert_eq!(s.expose(), "tskey-canary");
    }
}
