//! Service SAS for one blob, signed with the account key.
//!
//! `azure_storage_blob` 1.x cannot sign account-key SAS tokens (and `azure_storage_sas` 1.0 only
//! signs user-delegation SAS, which needs an Entra ID token), so this is the small missing piece.
//! Format: "Create a service SAS", string-to-sign for version 2020-12-06 and later
//! (<https://learn.microsoft.com/rest/api/storageservices/create-service-sas>):
//!
//! ```text
//! sp \n st \n se \n /blob/{account}/{container}/{blob} \n si \n sip \n spr \n sv \n sr \n
//! snapshot-time \n ses \n rscc \n rscd \n rsce \n rscl \n rsct
//! ```
//!
//! The signature is base64(HMAC-SHA256(base64-decoded account key, UTF-8 string-to-sign)).

use azure_core::credentials::Secret;
use azure_core::time::OffsetDateTime;

/// The signed-version we emit. 2020-12-06 is the first version with the 16-line string-to-sign
/// above; every Azure region and Azurite 3.x accept it.
pub const SAS_VERSION: &str = "2022-11-02";

/// Which protocols the token may be used over (`spr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// `https`: the only choice for real storage accounts.
    HttpsOnly,
    /// `https,http`: needed for a plain-http endpoint such as a loopback Azurite.
    HttpsAndHttp,
}

impl Protocols {
    fn as_str(self) -> &'static str {
        match self {
            Protocols::HttpsOnly => "https",
            Protocols::HttpsAndHttp => "https,http",
        }
    }
}

/// A read-only (`sp=r`) SAS scoped to a single blob (`sr=b`).
#[derive(Debug, Clone)]
pub struct BlobReadSas<'a> {
    pub account: &'a str,
    pub container: &'a str,
    /// The blob name as stored (not percent-encoded).
    pub blob: &'a str,
    pub start: Option<OffsetDateTime>,
    pub expiry: OffsetDateTime,
    pub protocols: Protocols,
}

/// `YYYY-MM-DDThh:mm:ssZ`, the UTC ISO 8601 form Azure accepts for `st`/`se`.
pub fn sas_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

impl BlobReadSas<'_> {
    const PERMISSIONS: &'static str = "r";
    const RESOURCE: &'static str = "b";

    /// The exact string the service recomputes and compares.
    pub fn string_to_sign(&self) -> String {
        let start = self.start.map(sas_time).unwrap_or_default();
        let canonical = format!("/blob/{}/{}/{}", self.account, self.container, self.blob);
        [
            Self::PERMISSIONS,
            &start,
            &sas_time(self.expiry),
            &canonical,
            "", // si: no stored access policy
            "", // sip: no IP range
            self.protocols.as_str(),
            SAS_VERSION,
            Self::RESOURCE,
            "", // snapshot time
            "", // ses: encryption scope
            "", // rscc
            "", // rscd
            "", // rsce
            "", // rscl
            "", // rsct
        ]
        .join("\n")
    }

    /// The query string (without `?`) to append to the blob URL.
    pub fn query(&self, account_key: &Secret) -> anyhow::Result<String> {
        let sig = azure_core::hmac::hmac_sha256(&self.string_to_sign(), account_key)
            .map_err(|e| anyhow::anyhow!("signing the SAS for blob {:?}: {e}", self.blob))?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("sv", SAS_VERSION);
        q.append_pair("spr", self.protocols.as_str());
        if let Some(st) = self.start {
            q.append_pair("st", &sas_time(st));
        }
        q.append_pair("se", &sas_time(self.expiry));
        q.append_pair("sr", Self::RESOURCE);
        q.append_pair("sp", Self::PERMISSIONS);
        q.append_pair("sig", &sig);
        Ok(q.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::{Date, Month, PrimitiveDateTime, Time};

    fn at(y: i32, m: Month, d: u8, hh: u8, mm: u8, ss: u8) -> OffsetDateTime {
        PrimitiveDateTime::new(
            Date::from_calendar_date(y, m, d).unwrap(),
            Time::from_hms(hh, mm, ss).unwrap(),
        )
        .assume_utc()
    }

    fn sample() -> BlobReadSas<'static> {
        BlobReadSas {
            account: "myaccount",
            container: "kiln",
            blob: "bundles/abc.tar.gz",
            start: None,
            expiry: at(2027, Month::June, 30, 0, 0, 0),
            protocols: Protocols::HttpsOnly,
        }
    }

    #[test]
    fn string_to_sign_follows_the_documented_16_line_layout() {
        let sts = sample().string_to_sign();
        let lines: Vec<&str> = sts.split('\n').collect();
        assert_eq!(lines.len(), 16, "{sts:?}");
        assert_eq!(
            sts,
            "r\n\n2027-06-30T00:00:00Z\n/blob/myaccount/kiln/bundles/abc.tar.gz\n\n\nhttps\n2022-11-02\nb\n\n\n\n\n\n\n"
        );
    }

    #[test]
    fn start_time_goes_on_the_second_line_and_into_the_query() {
        let mut sas = sample();
        sas.start = Some(at(2026, Month::November, 30, 5, 6, 7));
        let sts = sas.string_to_sign();
        assert_eq!(sts.split('\n').nth(1), Some("2026-11-30T05:06:07Z"));
        let q = sas.query(&Secret::new("a2V5")).unwrap();
        assert!(q.contains("st=2026-11-30T05%3A06%3A07Z"), "{q}");
    }

    #[test]
    fn http_endpoints_get_https_comma_http() {
        let mut sas = sample();
        sas.protocols = Protocols::HttpsAndHttp;
        assert_eq!(sas.string_to_sign().split('\n').nth(6), Some("https,http"));
    }

    // Vector computed independently with Python's hmac module:
    //   base64(hmac.new(base64.b64decode(KEY), sts.encode(), sha256).digest())
    // where KEY is Azurite's published development key and sts is `sample().string_to_sign()`.
    #[test]
    fn signature_matches_an_independent_hmac_sha256() {
        const AZURITE_DEV_KEY: &str =
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        let q = sample().query(&Secret::new(AZURITE_DEV_KEY)).unwrap();
        let sig: String = url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "sig")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        assert_eq!(sig, EXPECTED_SIG);
        assert_eq!(
            q.replace(
                &url::form_urlencoded::byte_serialize(EXPECTED_SIG.as_bytes()).collect::<String>(),
                "SIG"
            ),
            "sv=2022-11-02&spr=https&se=2027-06-30T00%3A00%3A00Z&sr=b&sp=r&sig=SIG"
        );
    }
    const EXPECTED_SIG: &str = "G3qpoH3grU7NP2UFIVdJ3BWwPyfJshW67v7VRkRdfdI=";
}
