//! Posting tokens: proof that an HTTP publisher is the session it names.
//!
//! Every `welcome` carries a token for its user id: an HMAC of the id under the
//! cluster's `--session-secret`. HTTP publishing (`POST .../messages`) names its
//! sender in the body; while that user id holds a session anywhere in the
//! cluster, the POST must carry the token, so nobody can speak for a connected
//! user. An id nobody holds may be used freely — exactly as anyone may open a
//! WebSocket under a free id. Any node can check a token: they share the secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::names::UserId;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: these MACs mean "may post as", nothing else.
const CONTEXT: &[u8] = b"warren posting token v1\0";

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

    fn mac(&self, user: &UserId) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(CONTEXT);
        mac.update(user.as_str().as_bytes());
        mac
    }

    pub fn issue(&self, user: &UserId) -> String {
        let tag = self.mac(user).finalize().into_bytes();
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Constant-time check of a token for `user`.
    pub fn verify(&self, user: &UserId, token: &str) -> bool {
        let Some(bytes) = decode_hex(token) else {
            return false;
        };
        self.mac(user).verify_slice(&bytes).is_ok()
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
    fn tokens_are_per_user_and_per_secret() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let a = Tokens::new(Some("shared"));
        let b = Tokens::new(Some("shared"));
        let token = a.issue(&alice);
        assert!(b.verify(&alice, &token), "nodes sharing the secret agree");
        assert!(!a.verify(&bob, &token));
        assert!(!Tokens::new(Some("other")).verify(&alice, &token));
        assert!(!a.verify(&alice, "zz"));
        assert!(!a.verify(&alice, ""));
        assert!(!a.verify(&alice, &token[..10]));
    }
}
