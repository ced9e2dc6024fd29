//! Room permissions: which rooms a user may read and write, as patterns.
//!
//! A pattern is a room name in which `*` stands for any run of characters
//! (`*`, `team-*`, `*-announce`). A token's `rooms` claim lists the rooms the
//! user may read and write; `rooms_read` lists further rooms it may only read.

use crate::names::RoomName;

/// A list of room patterns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoomPatterns(Vec<String>);

impl RoomPatterns {
    /// Patterns from a claim's or a flag's list. Each is a room name with `*`
    /// allowed.
    pub fn parse_list(list: &[String]) -> Result<Self, String> {
        for pattern in list {
            let literal = pattern.replace('*', "x");
            if pattern.len() > 64
                || !literal
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{pattern:?} is not a room pattern"));
            }
        }
        Ok(Self(list.to_vec()))
    }

    pub fn matches(&self, room: &RoomName) -> bool {
        self.0
            .iter()
            .any(|p| glob(p.as_bytes(), room.as_str().as_bytes()))
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some((c, rest)) => name
            .split_first()
            .is_some_and(|(n, tail)| n == c && glob(rest, tail)),
    }
}

/// What a session may do in which rooms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    write: RoomPatterns,
    read_only: RoomPatterns,
}

impl Permissions {
    pub fn new(write: RoomPatterns, read_only: RoomPatterns) -> Self {
        Self { write, read_only }
    }

    /// Read and write the same rooms.
    pub fn uniform(rooms: RoomPatterns) -> Self {
        Self::new(rooms, RoomPatterns::default())
    }

    /// Read these rooms, write none.
    pub fn read_only(rooms: RoomPatterns) -> Self {
        Self::new(RoomPatterns::default(), rooms)
    }

    pub fn may_read(&self, room: &RoomName) -> bool {
        self.write.matches(room) || self.read_only.matches(room)
    }

    pub fn may_write(&self, room: &RoomName) -> bool {
        self.write.matches(room)
    }

    /// Direct messages are writing too: a read-only user (a guest) may not.
    pub fn may_send_direct(&self) -> bool {
        !self.write.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    fn patterns(list: &[&str]) -> Result<RoomPatterns, String> {
        RoomPatterns::parse_list(&list.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn patterns_match_whole_names_with_stars() {
        let p = patterns(&["lobby", "team-*", "*-news"]).unwrap();
        for yes in ["lobby", "team-", "team-red", "daily-news"] {
            assert!(p.matches(&room(yes)), "{yes}");
        }
        for no in ["lobby2", "xteam-red", "team", "news"] {
            assert!(!p.matches(&room(no)), "{no}");
        }
        assert!(patterns(&["*"]).unwrap().matches(&room("anything")));
        assert!(!RoomPatterns::default().matches(&room("lobby")));
        assert!(patterns(&["bad room"]).is_err());
    }

    #[test]
    fn read_only_rooms_are_readable_not_writable() {
        let p = Permissions::new(
            patterns(&["team-*"]).unwrap(),
            patterns(&["announce"]).unwrap(),
        );
        assert!(p.may_read(&room("announce")) && !p.may_write(&room("announce")));
        assert!(p.may_read(&room("team-a")) && p.may_write(&room("team-a")));
        assert!(!p.may_read(&room("other")));
    }
}
