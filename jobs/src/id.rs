//! Job ids: ULIDs, the format apalis-sqlite stores in `Jobs.id` (time-ordered, so ordering by
//! id is ordering by creation time).

use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[derive(utoipa::ToSchema)]
pub struct JobId(String);

impl JobId {
    pub(crate) fn generate() -> Self {
        Self(ulid_string(
            Utc::now().timestamp_millis() as u64,
            rand::rng().random(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the job was created, from the id's timestamp.
    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        let ms = decode_time(&self.0)?;
        Utc.timestamp_millis_opt(ms as i64).single()
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn ulid_string(ms: u64, random: u128) -> String {
    let value: u128 = ((ms as u128 & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 125 - 5 * i as u32;
        *slot = CROCKFORD[((value >> shift) & 0x1F) as usize];
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

fn decode_time(s: &str) -> Option<u64> {
    if s.len() != 26 {
        return None;
    }
    let mut value: u128 = 0;
    for c in s.bytes() {
        let d = CROCKFORD
            .iter()
            .position(|&x| x == c.to_ascii_uppercase())? as u128;
        value = (value << 5) | d;
    }
    Some((value >> 80) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ulids_that_sort_by_time_and_carry_it() {
        let a = ulid_string(1_700_000_000_000, u128::MAX);
        let b = ulid_string(1_700_000_000_001, 0);
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert_eq!(decode_time(&a), Some(1_700_000_000_000));
        let id = JobId::generate();
        let age = Utc::now() - id.created_at().unwrap();
        assert!(age.num_seconds().abs() < 5);
        // The `ulid` crate's canonical example.
        assert_eq!(
            decode_time("01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            Some(1469922850259)
        );
    }
}
