//! Keys from the identity provider's JWKS endpoint (`--jwks-url`), cached.
//!
//! The set is fetched on first use, again when a token names a key id (`kid`)
//! the cache does not know (the provider rotated its keys; at most once per
//! [`MIN_REFETCH`], so a flood of made-up kids cannot make Warren hammer the
//! provider), and again once it is older than [`MAX_AGE`]. Only asymmetric
//! algorithms are accepted from a JWKS: a public key must never be usable as
//! an HMAC secret.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use super::AuthError;

/// How often an unknown `kid` may trigger a fetch.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// How old the cached set may grow before it is fetched again.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

type Key = (DecodingKey, Algorithm);

pub struct JwksCache {
    url: String,
    client: reqwest::Client,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
}

impl JwksCache {
    pub fn new(url: String) -> Self {
        Self {
            url,
            client: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .expect("an HTTP client with default settings builds"),
            state: Mutex::new(State::default()),
        }
    }

    /// The key that verifies `token`, by its header's `kid`.
    pub async fn key_for(&self, token: &str) -> Result<Key, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable header: {e}")))?;
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("the token names no key (kid)".into()))?;
        let mut state = self.state.lock().await;
        let stale = state.fetched.is_none_or(|at| at.elapsed() > MAX_AGE);
        let unknown = !state.keys.contains_key(&kid);
        let may_refetch = state.fetched.is_none_or(|at| at.elapsed() > MIN_REFETCH);
        if stale || (unknown && may_refetch) {
            match self.fetch().await {
                Ok(keys) => {
                    info!(keys = keys.len(), "fetched the JWKS");
                    state.keys = keys;
                }
                // Keep what we had: a provider that hiccups must not log
                // everyone out.
                Err(e) => warn!(error = %e, "fetching the JWKS failed"),
            }
            state.fetched = Some(Instant::now());
        }
        state
            .keys
            .get(&kid)
            .cloned()
            .ok_or_else(|| AuthError::Invalid(format!("unknown key id {kid:?}")))
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, String> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let set: JwkSet = response.json().await.map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Some(alg)) = (&jwk.common.key_id, jwk.common.key_algorithm) else {
                continue;
            };
            let Ok(algorithm) = Algorithm::from_str(&alg.to_string()) else {
                continue;
            };
            if matches!(
                algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) {
                continue;
            }
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), (key, algorithm));
            }
        }
        Ok(keys)
    }
}
