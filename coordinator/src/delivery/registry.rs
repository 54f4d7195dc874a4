//! Where participant services listen.
//!
//! A service name maps to one or more instances. Instances come from the
//! static configuration (`--participant SERVICE=URI`, never expire) or from
//! `Registry.Register` (a lease that expires unless renewed). Registrations
//! are kept in memory only: after a coordinator restart, services are back
//! within one renewal period, and phase-2 retries cover the gap.
//!
//! Any live instance may receive a call. [`Registry::pick`] rotates among
//! healthy instances; an instance that fails at the transport level is
//! marked down for a backoff period (1 s doubling to 30 s) and skipped while
//! others are up. Channels are created lazily and reused per endpoint.

use crate::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::config::fixed;
use crate::engine::validate;
use crate::error::{Error, Result};

/// One instance of a participant service.
#[derive(Clone, Debug)]
struct Instance {
    endpoint: String,
    /// `None` for static instances.
    expires: Option<Instant>,
    down_until: Option<Instant>,
    failures: u32,
}

/// A row of [`Registry::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Service name.
    pub service: String,
    /// Endpoint URI.
    pub endpoint: String,
    /// From static configuration.
    pub from_config: bool,
    /// Lease left, for registrations.
    pub expires_in: Option<Duration>,
    /// Not backing off after failures.
    pub healthy: bool,
}

/// The endpoint registry. See the module docs.
pub struct Registry {
    services: Mutex<HashMap<String, Vec<Instance>>>,
    channels: Mutex<HashMap<String, Channel>>,
    next: AtomicUsize,
    connect_timeout: Duration,
}

/// Checks an endpoint URI: http(s)://host:port, bounded length.
pub fn parse_endpoint(uri: &str) -> Result<Endpoint> {
    if uri.len() > fixed::MAX_ENDPOINT {
        return Err(Error::invalid(format!(
            "endpoint is {} bytes long; the limit is {}",
            uri.len(),
            fixed::MAX_ENDPOINT
        )));
    }
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return Err(Error::invalid(format!("endpoint {uri:?} must start with http:// or https://")));
    }
    let ep = Endpoint::from_shared(uri.to_string())
        .map_err(|e| Error::invalid(format!("endpoint {uri:?} is not a valid URI: {e}")))?;
    if ep.uri().host().is_none() || ep.uri().port_u16().is_none() {
        return Err(Error::invalid(format!("endpoint {uri:?} must name a host and a port")));
    }
    Ok(ep)
}

impl Registry {
    /// A registry holding the static `SERVICE=URI` entries.
    pub fn new(static_entries: &[String], connect_timeout: Duration) -> Result<Self> {
        let reg = Registry {
            services: Mutex::default(),
            channels: Mutex::default(),
            next: AtomicUsize::new(0),
            connect_timeout,
        };
        for entry in static_entries {
            let Some((service, uri)) = entry.split_once('=') else {
                return Err(Error::invalid(format!("participant {entry:?} must look like SERVICE=URI")));
            };
            validate::service_name("participant service", service)?;
            parse_endpoint(uri)?;
            reg.upsert(service, uri, None);
        }
        Ok(reg)
    }

    fn upsert(&self, service: &str, endpoint: &str, expires: Option<Instant>) {
        let mut services = lock(&self.services);
        let list = services.entry(service.to_string()).or_default();
        match list.iter_mut().find(|i| i.endpoint == endpoint) {
            // A static entry stays static; a registration renews its lease.
            Some(i) => {
                if i.expires.is_some() {
                    i.expires = expires;
                }
            }
            None => list.push(Instance { endpoint: endpoint.to_string(), expires, down_until: None, failures: 0 }),
        }
    }

    /// Registers or renews `endpoint` for `service` with a lease of `ttl_ms`
    /// (0 = default). Returns the lease granted.
    pub fn register(&self, service: &str, endpoint: &str, ttl_ms: u64) -> Result<Duration> {
        validate::service_name("service", service)?;
        parse_endpoint(endpoint)?;
        let ttl = if ttl_ms == 0 { fixed::DEFAULT_LEASE_MS } else { ttl_ms };
        if !(fixed::MIN_LEASE_MS..=fixed::MAX_LEASE_MS).contains(&ttl) {
            return Err(Error::invalid(format!(
                "ttl_ms {ttl} is out of range; allowed are {}..={} (or 0 for {})",
                fixed::MIN_LEASE_MS,
                fixed::MAX_LEASE_MS,
                fixed::DEFAULT_LEASE_MS
            )));
        }
        let ttl = Duration::from_millis(ttl);
        self.prune();
        {
            let services = lock(&self.services);
            let known = services.get(service);
            if known.is_none() && services.len() >= fixed::MAX_SERVICES {
                return Err(Error::LimitExceeded(format!(
                    "{} services are registered; the limit is {}",
                    services.len(),
                    fixed::MAX_SERVICES
                )));
            }
            if let Some(list) = known {
                if list.len() >= fixed::MAX_INSTANCES_PER_SERVICE && !list.iter().any(|i| i.endpoint == endpoint) {
                    return Err(Error::LimitExceeded(format!(
                        "service {service:?} has {} instances registered; the limit is {}",
                        list.len(),
                        fixed::MAX_INSTANCES_PER_SERVICE
                    )));
                }
            }
        }
        self.upsert(service, endpoint, Some(Instant::now() + ttl));
        Ok(ttl)
    }

    /// Removes a registered instance. Static instances stay.
    pub fn deregister(&self, service: &str, endpoint: &str) -> bool {
        let removed = {
            let mut services = lock(&self.services);
            let Some(list) = services.get_mut(service) else {
                return false;
            };
            let before = list.len();
            list.retain(|i| i.expires.is_none() || i.endpoint != endpoint);
            before != list.len()
        };
        self.prune();
        removed
    }

    /// Drops expired instances, services left without instances, and
    /// channels no instance uses, so registrations cannot pile up.
    fn prune(&self) {
        let now = Instant::now();
        let mut services = lock(&self.services);
        for list in services.values_mut() {
            list.retain(|i| i.expires.is_none_or(|e| e > now));
        }
        services.retain(|_, list| !list.is_empty());
        let mut channels = lock(&self.channels);
        channels.retain(|ep, _| services.values().flatten().any(|i| &i.endpoint == ep));
    }

    /// Every known instance, ordered by service and endpoint; expired leases
    /// are dropped on the way.
    pub fn list(&self, service: Option<&str>) -> Vec<EndpointInfo> {
        let now = Instant::now();
        let mut services = lock(&self.services);
        let mut out = Vec::new();
        for (name, list) in services.iter_mut() {
            list.retain(|i| i.expires.is_none_or(|e| e > now));
            if service.is_some_and(|s| s != name) {
                continue;
            }
            out.extend(list.iter().map(|i| EndpointInfo {
                service: name.clone(),
                endpoint: i.endpoint.clone(),
                from_config: i.expires.is_none(),
                expires_in: i.expires.map(|e| e.saturating_duration_since(now)),
                healthy: i.down_until.is_none_or(|d| d <= now),
            }));
        }
        out.sort_by(|a, b| (&a.service, &a.endpoint).cmp(&(&b.service, &b.endpoint)));
        out
    }

    /// An instance of `service` to call, with its channel: a healthy one in
    /// rotation, else the one that comes back soonest.
    pub fn pick(&self, service: &str) -> Option<(String, Channel)> {
        let now = Instant::now();
        let endpoint = {
            let mut services = lock(&self.services);
            let list = services.get_mut(service)?;
            list.retain(|i| i.expires.is_none_or(|e| e > now));
            let healthy: Vec<&Instance> = list.iter().filter(|i| i.down_until.is_none_or(|d| d <= now)).collect();
            if healthy.is_empty() {
                list.iter().min_by_key(|i| i.down_until)?.endpoint.clone()
            } else {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                healthy[n % healthy.len()].endpoint.clone()
            }
        };
        let channel = self.channel(&endpoint)?;
        Some((endpoint, channel))
    }

    fn channel(&self, endpoint: &str) -> Option<Channel> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(endpoint) {
            return Some(c.clone());
        }
        let ep = parse_endpoint(endpoint).ok()?.connect_timeout(self.connect_timeout).tcp_nodelay(true);
        let channel = ep.connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Some(channel)
    }

    /// Reports the outcome of a call at the transport level: a failure marks
    /// the instance down for a growing period, a success clears it.
    pub fn report(&self, endpoint: &str, reachable: bool) {
        let mut services = lock(&self.services);
        for i in services.values_mut().flatten().filter(|i| i.endpoint == endpoint) {
            if reachable {
                i.failures = 0;
                i.down_until = None;
            } else {
                i.failures = i.failures.saturating_add(1);
                let secs = 1u64 << i.failures.saturating_sub(1).min(5);
                i.down_until = Some(Instant::now() + Duration::from_secs(secs.min(30)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        match Registry::new(&["orders=http://127.0.0.1:7001".into()], Duration::from_secs(1)) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn static_entries_are_validated() {
        for bad in ["orders", "orders=127.0.0.1:1", "or ders=http://127.0.0.1:1", "orders=http://host"] {
            assert!(Registry::new(&[bad.into()], Duration::from_secs(1)).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn register_renew_deregister_and_rotation() {
        let r = reg();
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000).is_ok());
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000).is_ok(), "renewal");
        assert_eq!(r.list(Some("orders")).len(), 2);
        let picks: std::collections::HashSet<String> =
            (0..4).filter_map(|_| r.pick("orders").map(|(e, _)| e)).collect();
        assert_eq!(picks.len(), 2, "rotates across instances");
        assert!(r.deregister("orders", "http://127.0.0.1:7002"));
        assert!(!r.deregister("orders", "http://127.0.0.1:7001"), "static entries stay");
        assert_eq!(r.list(None).len(), 1);
        assert!(r.pick("nobody").is_none());
    }

    #[tokio::test]
    async fn an_instance_that_fails_is_skipped_while_another_is_up() {
        let r = reg();
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000).is_ok());
        r.report("http://127.0.0.1:7001", false);
        for _ in 0..4 {
            assert_eq!(r.pick("orders").map(|(e, _)| e).as_deref(), Some("http://127.0.0.1:7002"));
        }
        r.report("http://127.0.0.1:7002", false);
        assert!(r.pick("orders").is_some(), "all down: still try the one back soonest");
        r.report("http://127.0.0.1:7001", true);
        assert_eq!(r.pick("orders").map(|(e, _)| e).as_deref(), Some("http://127.0.0.1:7001"));
    }

    #[tokio::test]
    async fn registrations_are_bounded_and_pruned() {
        let r = reg();
        for i in 0..fixed::MAX_INSTANCES_PER_SERVICE {
            assert!(r.register("many", &format!("http://127.0.0.1:{}", 10_000 + i), 5_000).is_ok());
        }
        let over = r.register("many", "http://127.0.0.1:9999", 5_000);
        assert!(matches!(over, Err(Error::LimitExceeded(_))), "{over:?}");
        assert!(r.register("many", "http://127.0.0.1:10000", 5_000).is_ok(), "renewing stays allowed");
        let _ = r.pick("many");
        assert_eq!(lock(&r.channels).len(), 1, "one pick, one channel");
        for i in 0..fixed::MAX_INSTANCES_PER_SERVICE {
            assert!(r.deregister("many", &format!("http://127.0.0.1:{}", 10_000 + i)));
        }
        assert!(r.register("many", "http://127.0.0.1:9999", 5_000).is_ok(), "room again");
        assert_eq!(lock(&r.channels).len(), 0, "channels of removed instances dropped");
    }

    #[test]
    fn bad_registrations_are_refused() {
        let r = reg();
        assert!(r.register("", "http://127.0.0.1:1", 0).is_err());
        assert!(r.register("a", "ftp://x:1", 0).is_err());
        assert!(r.register("a", "http://127.0.0.1:1", 10).is_err(), "lease too short");
        assert!(r.register("a", "http://127.0.0.1:1", 0).is_ok());
    }
}
