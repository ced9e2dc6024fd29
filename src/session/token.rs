//! A session's token running out: the warning ahead of time, `refresh`, and
//! the end.
//!
//! A session admitted with a token holds a [`crate::auth::Grant`] that expires
//! at the token's `exp`. [`WARN_AHEAD`] before then (or halfway, for a token
//! shorter than twice that) the client gets `token_expiring`; a `refresh` with
//! a valid token for the same user replaces the grant (and its permissions)
//! and answers `refreshed`; at `exp` without one, the session ends with close
//! 4001 (`token expired`), as Centrifugo does.

use std::ops::ControlFlow::{self, Break};
use std::time::Duration;

use tokio::time::Instant;

use super::events::Session;
use super::{SessionEnd, Transport};
use crate::bus::SessionLink;
use crate::error::{ClientError, ErrorCode};
use crate::protocol::ServerFrame;
use crate::protocol::client::Rejected;

/// How long before `exp` the client is told.
pub const WARN_AHEAD: Duration = Duration::from_secs(30);

/// Seconds from now until the Unix time `at` (zero once it passed).
fn until(at: u64) -> Duration {
    let now = crate::protocol::now_ms() / 1000;
    Duration::from_secs(at.saturating_sub(now))
}

impl<T: Transport, P: SessionLink> Session<'_, T, P> {
    /// When the token timer should next fire: the warning, then the end.
    /// Far away for a session without a token.
    pub(super) fn token_deadline(&self) -> Instant {
        let Some(expires_at) = self.grant.expires_at else {
            return Instant::now() + Duration::from_secs(86_400 * 365);
        };
        let left = until(expires_at);
        if self.warned {
            return Instant::now() + left;
        }
        Instant::now() + left.saturating_sub(WARN_AHEAD.min(left / 2))
    }

    /// The token timer fired: warn once, then end the session.
    pub(super) async fn on_token_timer(&mut self) -> ControlFlow<SessionEnd> {
        let Some(expires_at) = self.grant.expires_at else {
            return ControlFlow::Continue(());
        };
        self.token_epoch += 1;
        if !self.warned && until(expires_at) > Duration::ZERO {
            self.warned = true;
            return self
                .write_frame(&ServerFrame::TokenExpiring { expires_at })
                .await;
        }
        Break(SessionEnd::TokenExpired)
    }

    /// `{"type":"refresh"}`: take a fresh token for the same user.
    pub(super) async fn refresh(
        &mut self,
        token: String,
        reference: Option<String>,
    ) -> ControlFlow<SessionEnd> {
        let grant = match self.node.auth.verify(&token).await {
            Ok(grant) if grant.user == self.identity.user => grant,
            Ok(grant) => {
                let error = ClientError::new(
                    ErrorCode::InvalidToken,
                    format!(
                        "the token is for {}, not {}",
                        grant.user, self.identity.user
                    ),
                );
                return self.refuse(Rejected { error, reference }).await;
            }
            Err(e) => {
                let error = ClientError::from(e);
                return self.refuse(Rejected { error, reference }).await;
            }
        };
        let expires_at = grant.expires_at.unwrap_or_default();
        self.grant = grant;
        self.warned = false;
        self.token_epoch += 1;
        self.write_frame(&ServerFrame::Refreshed {
            expires_at,
            reference,
        })
        .await
    }
}
