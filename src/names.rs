//! Validated names: rooms and users.
//!
//! Both end up inside AMQP exchange and queue names (`<prefix>.room.<room>`,
//! `<prefix>.user.<user>`), so they are restricted to `[A-Za-z0-9_-]` and checked
//! once, at the edge, before anything reaches the bus.

use std::fmt;

use rand::Rng;
use thiserror::Error;

/// Longest room name accepted.
pub const MAX_ROOM_LEN: usize = 64;
/// Longest user id accepted.
pub const MAX_USER_LEN: usize = 32;

/// Why a name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("room must be 1-{MAX_ROOM_LEN} characters of A-Z a-z 0-9 _ -")]
    InvalidRoom,
    #[error("user must be 1-{MAX_USER_LEN} characters of A-Z a-z 0-9 _ -")]
    InvalidUser,
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A room name: 1–64 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);

impl RoomName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if is_name(s, MAX_ROOM_LEN) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::InvalidRoom)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user id: 1–32 of `[A-Za-z0-9_-]`, unique across the cluster while connected.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if is_name(s, MAX_USER_LEN) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::InvalidUser)
        }
    }

    /// `guest-<random>` for clients that connect without a name. 40 bits of randomness
    /// keep collisions unlikely; a collision is refused as `user_taken` like any other.
    pub fn guest() -> Self {
        let n: u64 = rand::rng().random_range(0..(1u64 << 40));
        Self(format!("guest-{n:010x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session's id: 32 random hex digits, fresh for every connection. It names
/// the session's queue (`<prefix>.conn.<session>`), so it must be unique across
/// the cluster; it is unguessable, so a later resume can be bound to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    pub fn random() -> Self {
        let n: u128 = rand::rng().random();
        Self(format!("{n:032x}"))
    }

    /// A session id as clients echo it back: 32 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert!(RoomName::parse("lobby").is_ok());
        assert!(RoomName::parse("a-b_C9").is_ok());
        assert!(RoomName::parse(&"r".repeat(64)).is_ok());
        assert_eq!(
            RoomName::parse(&"r".repeat(65)),
            Err(NameError::InvalidRoom)
        );
        for bad in ["", "a.b", "a b", "é", "a/b", "#x"] {
            assert_eq!(RoomName::parse(bad), Err(NameError::InvalidRoom), "{bad:?}");
        }
    }

    #[test]
    fn users() {
        assert!(UserId::parse(&"u".repeat(32)).is_ok());
        assert_eq!(UserId::parse(&"u".repeat(33)), Err(NameError::InvalidUser));
        assert_eq!(UserId::parse("al ice"), Err(NameError::InvalidUser));
        let guest = UserId::guest();
        assert!(guest.as_str().starts_with("guest-"));
        assert!(UserId::parse(guest.as_str()).is_ok());
        assert_ne!(UserId::guest(), UserId::guest());
    }
}
