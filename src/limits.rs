//! Per-address connection limits: how many connections one client address
//! may open per second, and hold open at once.
//!
//! The address is the TCP peer's, or, when the peer is one of
//! `--trusted-proxies` (the load balancer), the last address its
//! `X-Forwarded-For` names: the one the proxy itself saw. Anything else in that
//! header was written by the client and proves nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;
use crate::error::ClientError;
use crate::metrics::Metrics;

/// Keyed limiters keep one entry per address ever seen; past this many they
/// forget the addresses that are back to a full bucket.
const FORGET_ABOVE: usize = 10_000;

pub struct ConnectionLimits {
    per_second: DefaultKeyedRateLimiter<IpAddr>,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_open: usize,
    trusted: Vec<ipnet::IpNet>,
}

/// One open connection of an address; dropping it frees the place.
pub struct OpenConnection {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(config: &Config) -> Self {
        let rate = NonZeroU32::new(config.connections_per_ip_per_sec.max(1)).expect("at least 1");
        Self {
            per_second: RateLimiter::keyed(Quota::per_second(rate)),
            open: Arc::default(),
            max_open: config.max_connections_per_ip,
            trusted: config.trusted_proxies.clone(),
        }
    }

    /// The client's address: the peer's, or what a trusted proxy says.
    pub fn client_ip(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted.iter().any(|net| net.contains(&peer)) {
            return Some(peer);
        }
        let forwarded = forwarded_for
            .and_then(|list| list.rsplit(',').next())
            .and_then(|last| last.trim().parse().ok());
        Some(forwarded.unwrap_or(peer))
    }

    /// Let one more connection of `ip` in, or say how long to wait.
    pub fn admit(&self, ip: IpAddr, metrics: &Metrics) -> Result<OpenConnection, ClientError> {
        if let Err(not_until) = self.per_second.check_key(&ip) {
            metrics.rate_limited("connect_rate");
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ClientError::rate_limited(
                "too many new connections from your address; retry shortly",
                wait,
            ));
        }
        if self.per_second.len() > FORGET_ABOVE {
            self.per_second.retain_recent();
        }
        let mut open = self.open.lock().unwrap();
        let count = open.entry(ip).or_default();
        if *count >= self.max_open {
            metrics.rate_limited("open_per_ip");
            return Err(ClientError::rate_limited(
                format!(
                    "your address has {} connections open already",
                    self.max_open
                ),
                Duration::from_secs(1),
            ));
        }
        *count += 1;
        Ok(OpenConnection {
            open: self.open.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_sec: u32, max_open: usize, trusted: &[&str]) -> ConnectionLimits {
        let mut c = Config::defaults();
        c.connections_per_ip_per_sec = per_sec;
        c.max_connections_per_ip = max_open;
        c.trusted_proxies = trusted
            .iter()
            .map(|t| t.parse::<IpAddr>().unwrap().into())
            .collect();
        ConnectionLimits::new(&c)
    }

    #[test]
    fn open_connections_per_address_are_capped_and_freed() {
        let l = limits(1000, 2, &[]);
        let m = Metrics::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.admit(ip, &m).unwrap();
        let _b = l.admit(ip, &m).unwrap();
        let refused = l.admit(ip, &m).err().unwrap();
        assert_eq!(refused.code, crate::error::ErrorCode::RateLimited);
        assert!(
            l.admit("10.0.0.2".parse().unwrap(), &m).is_ok(),
            "per address"
        );
        drop(a);
        assert!(l.admit(ip, &m).is_ok());
    }

    #[test]
    fn new_connections_per_second_are_limited() {
        let l = limits(3, 100, &[]);
        let m = Metrics::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let kept: Vec<_> = (0..3).map(|_| l.admit(ip, &m).unwrap()).collect();
        let refused = l.admit(ip, &m).err().unwrap();
        assert!(refused.retry_after_ms.unwrap() > 0);
        drop(kept);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = limits(10, 10, &["127.0.0.1"]);
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "10.9.9.9".parse().unwrap();
        let header = Some("1.2.3.4, 5.6.7.8");
        assert_eq!(
            l.client_ip(Some(proxy), header),
            Some("5.6.7.8".parse().unwrap())
        );
        assert_eq!(l.client_ip(Some(stranger), header), Some(stranger));
        assert_eq!(l.client_ip(Some(proxy), None), Some(proxy));
        assert_eq!(l.client_ip(Some(proxy), Some("garbage")), Some(proxy));
    }
}
