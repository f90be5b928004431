//! The one download path: stream to `.partial`, sha256 while streaming, rename only on match.

/// Fetches pinned artifacts into the verified cache (`/var/lib/kiln/cache/<sha256>`).
pub struct Fetcher {}
