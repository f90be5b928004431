//! When the bundle's read URL stops working.
//!
//! Accepted forms: an absolute `YYYY-MM-DD` (midnight UTC starting that day) or RFC 3339
//! timestamp, which keeps the payload byte-identical across publishes; or `<N>d`, N days from
//! today rounded down to midnight UTC, so publishing twice on one day still gives one payload.

use anyhow::{bail, Context as _, Result};
use azure_core::time::{Duration, OffsetDateTime};

pub const DEFAULT: &str = "30d";

/// Shortest validity we accept: the VM must be able to boot and fetch the bundle.
pub const MIN_VALIDITY: Duration = Duration::hours(1);

pub fn parse(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime> {
    let s = s.trim();
    if let Some(days) = s.strip_suffix('d') {
        let days: i64 = days
            .parse()
            .ok()
            .filter(|d| (1..=3650).contains(d))
            .with_context(|| format!("expiry {s:?}: expected <days>d with 1..=3650 days"))?;
        let midnight = now.replace_time(time::Time::MIDNIGHT);
        return Ok(midnight + Duration::days(days));
    }
    if s.len() == 10 {
        return azure_core::time::parse_rfc3339(&format!("{s}T00:00:00Z"))
            .map_err(|_| anyhow::anyhow!("expiry {s:?}: expected YYYY-MM-DD"));
    }
    azure_core::time::parse_rfc3339(s).map_err(|_| {
        anyhow::anyhow!("expiry {s:?}: expected YYYY-MM-DD, an RFC 3339 time, or <days>d")
    })
}

pub fn check_in_future(expiry: OffsetDateTime) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    if expiry < now + MIN_VALIDITY {
        bail!(
            "the bundle URL would expire at {} (less than an hour from now); choose a later expiry",
            super::sas::sas_time(expiry)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        azure_core::time::parse_rfc3339("2026-11-30T05:40:12Z").unwrap()
    }

    #[test]
    fn relative_days_round_down_to_midnight_for_a_stable_payload() {
        let e = parse("30d", now()).unwrap();
        assert_eq!(super::super::sas::sas_time(e), "2026-12-30T00:00:00Z");
    }

    #[test]
    fn absolute_dates_and_times() {
        let e = parse("2027-06-30", now()).unwrap();
        assert_eq!(super::super::sas::sas_time(e), "2027-06-30T00:00:00Z");
        let e = parse("2027-06-30T12:00:00+02:00", now()).unwrap();
        assert_eq!(super::super::sas::sas_time(e), "2027-06-30T10:00:00Z");
    }

    #[test]
    fn nonsense_is_refused_with_the_accepted_forms() {
        for bad in ["", "0d", "-3d", "99999d", "tomorrow", "2027-13-01"] {
            let err = parse(bad, now()).unwrap_err().to_string();
            assert!(err.contains("expected"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn past_expiry_is_refused() {
        assert!(check_in_future(now()).is_err());
        assert!(check_in_future(OffsetDateTime::now_utc() + Duration::days(1)).is_ok());
    }
}
