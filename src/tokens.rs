//! Posting tokens (anonymous servers): proof that an HTTP publisher is the
//! session it names.
//!
//! Without a JWT key, ids are self-asserted, and a `POST .../messages` names
//! its sender in the body. It must carry the posting token of a live session of
//! that id: `<session>.<mac>`, where the MAC covers the user id and the session
//! id under the cluster's `--session-secret`. Any node can check the MAC (they
//! share the secret); the session must still be alive, which the bus answers
//! (its queue exists). So a token belongs to one session and dies with it, and
//! a POST under an id nobody holds is refused: applications publish through the
//! server API instead.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::names::{SessionId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: these MACs mean "this session may post as", nothing else.
const CONTEXT: &[u8] = b"warren posting token v2\0";

#[derive(Clone)]
pub struct Tokens {
    secret: Vec<u8>,
}

impl Tokens {
    /// `secret` as configured, or a random one (fine for one node; a cluster
    /// must share it, or a token from one node fails on the others).
    pub fn new(secret: Option<&str>) -> Self {
        let secret = match secret {
            Some(s) if !s.is_empty() => s.as_bytes().to_vec(),
            _ => rand::random::<[u8; 32]>().to_vec(),
        };
        Self { secret }
    }

    fn mac(&self, user: &UserId, session: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(CONTEXT);
        mac.update(user.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(session.as_bytes());
        mac
    }

    pub fn issue(&self, user: &UserId, session: &SessionId) -> String {
        let tag = self.mac(user, session.as_str()).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("{session}.{hex}")
    }

    /// The session a token for `user` was issued to, if its MAC is right
    /// (constant-time). Whether that session still lives is the caller's to ask.
    pub fn session_of(&self, user: &UserId, token: &str) -> Option<SessionId> {
        let (session, tag) = token.split_once('.')?;
        let bytes = decode_hex(tag)?;
        self.mac(user, session).verify_slice(&bytes).ok()?;
        SessionId::parse(session)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_user_session_and_secret() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let session = SessionId::random();
        let a = Tokens::new(Some("shared"));
        let b = Tokens::new(Some("shared"));
        let token = a.issue(&alice, &session);
        assert_eq!(
            b.session_of(&alice, &token),
            Some(session.clone()),
            "nodes sharing the secret agree"
        );
        assert_eq!(a.session_of(&bob, &token), None);
        assert_eq!(Tokens::new(Some("other")).session_of(&alice, &token), None);
        let other = SessionId::random();
        let (_, tag) = token.split_once('.').unwrap();
        assert_eq!(
            a.session_of(&alice, &format!("{other}.{tag}")),
            None,
            "bound to its session"
        );
        assert_eq!(a.session_of(&alice, "zz"), None);
        assert_eq!(a.session_of(&alice, ""), None);
        assert_eq!(a.session_of(&alice, &token[..40]), None);
    }
}
