//! Who a client is: the application's signed tokens (JWT), verified here, and
//! what their claims allow.
//!
//! Warren takes identity from the application's own auth. A token is a JWT
//! whose `sub` is the user id and whose `exp` is required; `nbf`, `iss` and
//! `aud` are checked when configured. Keys: an HS256 secret
//! (`--jwt-secret`), an RS256/ES256 public key in PEM (`--jwt-public-key`),
//! or the identity provider's JWKS (`--jwks-url`, [`jwks`]). With none of
//! them Warren is **anonymous**: ids are self-asserted, as before.
//!
//! A verified token becomes a [`Grant`]: the user, when the token expires, and
//! which rooms it may read and write ([`rooms`]).

pub mod jwks;
pub mod rooms;

use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{ClientError, ErrorCode};
use crate::names::UserId;
pub use rooms::{Permissions, RoomPatterns};

/// What a verified token (or an anonymous connection) may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: UserId,
    /// Unix seconds after which the token no longer holds; `None` for
    /// anonymous sessions, which never expire.
    pub expires_at: Option<u64>,
    pub permissions: Permissions,
}

/// The claims Warren reads. Others are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// Rooms the user may read and write, as patterns (`team-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Further rooms the user may only read (announcement rooms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms_read: Option<Vec<String>>,
}

/// Why a token was not accepted. Each is answered `401` with its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this server requires a token")]
    Required,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
}

impl From<AuthError> for ClientError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Required => ErrorCode::TokenRequired,
            AuthError::Invalid(_) => ErrorCode::InvalidToken,
            AuthError::Expired => ErrorCode::TokenExpired,
        };
        ClientError::new(code, e.to_string())
    }
}

/// Why the auth settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("--jwt-secret, --jwt-public-key and --jwks-url are alternatives: give one")]
    SeveralKeys,
    #[error("cannot read the public key {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither an RSA nor an EC public key in PEM")]
    BadKey { path: String },
    #[error("--allow-anonymous needs a key: without one every connection is anonymous")]
    AnonymousWithoutKey,
    #[error("a room pattern in --default-rooms is not valid: {0}")]
    BadPattern(String),
}

/// Where signatures are checked against.
enum Keys {
    Static(DecodingKey, Algorithm),
    Jwks(jwks::JwksCache),
}

/// The node's authenticator.
pub struct Auth {
    keys: Option<Keys>,
    issuer: Option<String>,
    audience: Option<String>,
    allow_anonymous: bool,
    default_rooms: RoomPatterns,
}

impl Auth {
    pub fn from_config(config: &Config) -> Result<Self, AuthConfigError> {
        // An empty value (an unset variable passed through, as compose does)
        // means unset, never an empty HMAC key.
        let secret = config.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let jwks_url = config.jwks_url.as_deref().filter(|s| !s.is_empty());
        let given = [
            secret.is_some(),
            config.jwt_public_key.is_some(),
            jwks_url.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(AuthConfigError::SeveralKeys);
        }
        let keys = if let Some(secret) = secret {
            Some(Keys::Static(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ))
        } else if let Some(path) = &config.jwt_public_key {
            Some(read_public_key(path)?)
        } else {
            jwks_url.map(|url| Keys::Jwks(jwks::JwksCache::new(url.to_owned())))
        };
        if keys.is_none() && config.allow_anonymous {
            return Err(AuthConfigError::AnonymousWithoutKey);
        }
        let default_rooms =
            RoomPatterns::parse_list(&config.default_rooms).map_err(AuthConfigError::BadPattern)?;
        Ok(Self {
            keys,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            allow_anonymous: config.allow_anonymous,
            default_rooms,
        })
    }

    /// No key: ids are self-asserted, tokens are neither needed nor checked.
    pub fn is_anonymous(&self) -> bool {
        self.keys.is_none()
    }

    /// Who a connection is, from its token if it brought one. `claimed` is
    /// the self-asserted id of an anonymous server (or a guest's).
    pub async fn admit(
        &self,
        token: Option<&str>,
        claimed: Option<UserId>,
    ) -> Result<Grant, AuthError> {
        match (&self.keys, token) {
            (None, _) => Ok(Grant {
                user: claimed.unwrap_or_else(UserId::guest),
                expires_at: None,
                permissions: Permissions::uniform(self.default_rooms.clone()),
            }),
            (Some(_), Some(token)) => self.verify(token).await,
            (Some(_), None) if self.allow_anonymous => Ok(Grant {
                user: UserId::guest(),
                expires_at: None,
                permissions: Permissions::read_only(self.default_rooms.clone()),
            }),
            (Some(_), None) => Err(AuthError::Required),
        }
    }

    /// Verify a token's signature and claims.
    pub async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let (key, algorithm) = match &self.keys {
            None => return Err(AuthError::Invalid("this server takes no tokens".into())),
            Some(Keys::Static(key, algorithm)) => (key.clone(), *algorithm),
            Some(Keys::Jwks(cache)) => cache.key_for(token).await?,
        };
        let mut validation = Validation::new(algorithm);
        // Expiry is exact: a refresh is expected before `exp`, not after.
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        let user = UserId::parse(&claims.sub)
            .map_err(|_| AuthError::Invalid("sub is not a valid user id".into()))?;
        let permissions = match (&claims.rooms, &claims.rooms_read) {
            (None, None) => Permissions::uniform(self.default_rooms.clone()),
            (rooms, read) => Permissions::new(
                RoomPatterns::parse_list(rooms.as_deref().unwrap_or(&[]))
                    .map_err(AuthError::Invalid)?,
                RoomPatterns::parse_list(read.as_deref().unwrap_or(&[]))
                    .map_err(AuthError::Invalid)?,
            ),
        };
        Ok(Grant {
            user,
            expires_at: Some(claims.exp),
            permissions,
        })
    }
}

fn read_public_key(path: &Path) -> Result<Keys, AuthConfigError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| AuthConfigError::Unreadable {
        path: shown.clone(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(Keys::Static(key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Keys::Static(key, Algorithm::ES256));
    }
    Err(AuthConfigError::BadKey { path: shown })
}

/// Sign an HS256 development token (`warren token`).
pub fn mint(secret: &str, claims: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing does not fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::now_ms;

    fn config(secret: Option<&str>) -> Config {
        let mut c = Config::defaults();
        c.jwt_secret = secret.map(str::to_owned);
        c
    }

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            exp,
            rooms: None,
            rooms_read: None,
        }
    }

    fn later() -> u64 {
        now_ms() / 1000 + 3600
    }

    #[tokio::test]
    async fn a_signed_token_names_its_user_and_expiry() {
        let auth = Auth::from_config(&config(Some("s3cret"))).unwrap();
        let token = mint("s3cret", &claims("alice", later()));
        let grant = auth.admit(Some(&token), None).await.unwrap();
        assert_eq!(grant.user.as_str(), "alice");
        assert_eq!(grant.expires_at, Some(later()));
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_with_their_reason() {
        let auth = Auth::from_config(&config(Some("s3cret"))).unwrap();
        assert_eq!(auth.admit(None, None).await, Err(AuthError::Required));
        let forged = mint("not-the-secret", &claims("alice", later()));
        assert!(matches!(
            auth.admit(Some(&forged), None).await,
            Err(AuthError::Invalid(_))
        ));
        let expired = mint("s3cret", &claims("alice", now_ms() / 1000 - 10));
        assert_eq!(
            auth.admit(Some(&expired), None).await,
            Err(AuthError::Expired)
        );
        assert!(matches!(
            auth.admit(Some("not.a.jwt"), None).await,
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = mint("s3cret", &claims("no spaces", later()));
        assert!(matches!(
            auth.admit(Some(&bad_sub), None).await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn without_a_key_ids_are_self_asserted() {
        let auth = Auth::from_config(&config(None)).unwrap();
        assert!(auth.is_anonymous());
        let bob = UserId::parse("bob").unwrap();
        let grant = auth.admit(None, Some(bob.clone())).await.unwrap();
        assert_eq!((grant.user, grant.expires_at), (bob, None));
    }

    #[tokio::test]
    async fn guests_may_only_read_when_allowed_at_all() {
        let mut c = config(Some("s3cret"));
        c.allow_anonymous = true;
        let auth = Auth::from_config(&c).unwrap();
        let guest = auth.admit(None, None).await.unwrap();
        assert!(guest.user.as_str().starts_with("guest-"));
        let lobby = crate::names::RoomName::parse("lobby").unwrap();
        assert!(guest.permissions.may_read(&lobby));
        assert!(!guest.permissions.may_write(&lobby));
    }

    #[tokio::test]
    async fn issuer_audience_and_not_before_are_checked_when_set() {
        #[derive(Serialize)]
        struct Full<'a> {
            sub: &'a str,
            exp: u64,
            iss: &'a str,
            aud: &'a str,
            nbf: u64,
        }
        let sign = |iss, aud, nbf| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &Full {
                    sub: "alice",
                    exp: later(),
                    iss,
                    aud,
                    nbf,
                },
                &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap()
        };
        let now = now_ms() / 1000;
        let mut c = config(Some("s3cret"));
        c.jwt_issuer = Some("https://id.example".into());
        c.jwt_audience = Some("warren".into());
        let auth = Auth::from_config(&c).unwrap();
        assert!(
            auth.verify(&sign("https://id.example", "warren", now - 5))
                .await
                .is_ok()
        );
        for bad in [
            sign("https://evil.example", "warren", now - 5),
            sign("https://id.example", "other", now - 5),
            sign("https://id.example", "warren", now + 600),
        ] {
            assert!(matches!(
                auth.verify(&bad).await,
                Err(AuthError::Invalid(_))
            ));
        }
        // Unset, iss and aud are not checked.
        let open = Auth::from_config(&config(Some("s3cret"))).unwrap();
        assert!(
            open.verify(&sign("anyone", "anything", now - 5))
                .await
                .is_ok()
        );
    }

    #[test]
    fn one_key_source_at_a_time() {
        let mut c = config(Some("s3cret"));
        c.jwks_url = Some("http://127.0.0.1:1/jwks".into());
        assert!(matches!(
            Auth::from_config(&c),
            Err(AuthConfigError::SeveralKeys)
        ));
        let mut c = config(None);
        c.allow_anonymous = true;
        assert!(matches!(
            Auth::from_config(&c),
            Err(AuthConfigError::AnonymousWithoutKey)
        ));
    }
}
