//! Time as the operator handles it: Unix seconds everywhere in the pure code (passed in, never
//! read there), converted to Kubernetes `Time` at the status edge. [`unix_now`] is the one place
//! the shells read the clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Kubernetes time from Unix seconds.
pub fn k8s_time(secs: u64) -> Time {
    Time(Timestamp::from_second(secs as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Unix seconds of a Kubernetes time (`None` before 1970).
pub fn unix_secs(t: &Time) -> Option<u64> {
    u64::try_from(t.0.as_second()).ok()
}
