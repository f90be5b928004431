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
