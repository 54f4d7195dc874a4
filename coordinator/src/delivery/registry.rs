//! Where participant services listen.
//!
//! A service name maps to one or more instances. Instances come from the
//! static configuration (`--participant SERVICE=URI`, never expire) or from
//! `Registry.Register` (a lease that expires unless renewed, by the
//! injected clock). Registrations are written to the store before they are
//! acknowledged, so a restart loses none, and read back from it: at start,
//! and, with a store shared by several coordinators, every
//! [`REFRESH`] ([`run`]), so an instance registered through one coordinator
//! is called by all of them. Calls use an in-memory copy.
//!
//! Any live instance may receive a call. [`Registry::pick`] rotates among
//! healthy instances; an instance that fails at the transport level is
//! marked down for a backoff period (1 s doubling to 30 s) and skipped while
//! others are up. Channels are created lazily and reused per service and
//! endpoint.
//!
//! With TLS material that has a client CA ([`Tls::delivers_over_tls`]),
//! only `https://` endpoints are accepted, and every channel verifies that
//! the server's certificate names the service it is kept for (see
//! [`crate::auth::tls`]); a channel is never shared between services, so
//! an endpoint registered under two names is checked against each.

use crate::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::warn;

use crate::auth::tls::Tls;
use crate::clock::Clock;
use crate::config::fixed;
use crate::engine::validate;
use crate::error::{Error, Result};
use crate::model::Registration;
use crate::store::Store;

/// How often a coordinator on a shared store reads the registrations
/// again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// One instance of a participant service.
#[derive(Clone, Debug)]
struct Instance {
    endpoint: String,
    /// When the lease ends (unix ms); `None` for static instances.
    expires: Option<i64>,
    /// The peer address that registered it through this coordinator, in
    /// open mode (see [`Quota::PerPeer`]); not stored.
    peer: Option<IpAddr>,
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
    /// The last call at the transport level succeeded (or none failed).
    pub healthy: bool,
    /// Transport-level failures in a row.
    pub consecutive_failures: u32,
}

/// The endpoint registry. See the module docs.
pub struct Registry {
    services: Mutex<HashMap<String, Vec<Instance>>>,
    /// By (service, endpoint).
    channels: Mutex<HashMap<(String, String), Channel>>,
    next: AtomicUsize,
    connect_timeout: Duration,
    tls: Option<Arc<Tls>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Registrations and deregistrations made through this registry (see
    /// [`Registry::load`]).
    changes: AtomicUsize,
}

/// Adds an instance, or renews a registered one's lease (a static entry
/// stays static).
fn upsert(
    services: &mut HashMap<String, Vec<Instance>>,
    service: &str,
    endpoint: &str,
    expires: Option<i64>,
    peer: Option<IpAddr>,
) {
    let list = services.entry(service.to_string()).or_default();
    match list.iter_mut().find(|i| i.endpoint == endpoint) {
        Some(i) => {
            if i.expires.is_some() {
                i.expires = expires;
                i.peer = i.peer.or(peer);
            }
        }
        None => list.push(Instance { endpoint: endpoint.to_string(), expires, peer, down_until: None, failures: 0 }),
    }
}

/// How many registrations a caller may hold (renewing one it has is
/// always allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    /// No limit but the registry's own.
    Unlimited,
    /// An identity under a policy: at most this many endpoints of its
    /// service (`max_endpoints_per_identity`).
    PerIdentity(usize),
    /// Open mode (no policy): one peer address holds at most
    /// [`fixed::MAX_REGISTRATIONS_PER_PEER`] registrations, so that one
    /// caller cannot fill every service slot.
    PerPeer(IpAddr),
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
    /// A registry holding the static `SERVICE=URI` entries; call
    /// [`Registry::load`] before use to add the stored registrations.
    pub fn new(
        static_entries: &[String],
        connect_timeout: Duration,
        tls: Option<Arc<Tls>>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let reg = Registry {
            services: Mutex::default(),
            channels: Mutex::default(),
            next: AtomicUsize::new(0),
            connect_timeout,
            tls,
            store,
            clock,
            changes: AtomicUsize::new(0),
        };
        for entry in static_entries {
            let Some((service, uri)) = entry.split_once('=') else {
                return Err(Error::invalid(format!("participant {entry:?} must look like SERVICE=URI")));
            };
            validate::service_name("participant service", service)?;
            parse_endpoint(uri)?;
            reg.check_scheme(uri)?;
            reg.upsert(service, uri, None, None);
        }
        Ok(reg)
    }

    /// Over TLS, only https:// endpoints.
    fn check_scheme(&self, endpoint: &str) -> Result<()> {
        if self.tls.as_ref().is_some_and(|t| t.delivers_over_tls()) && !endpoint.starts_with("https://") {
            return Err(Error::invalid(format!(
                "endpoint {endpoint:?} is plaintext; this coordinator calls participants over TLS only (--tls-client-ca): give an https:// endpoint"
            )));
        }
        Ok(())
    }

    fn upsert(&self, service: &str, endpoint: &str, expires: Option<i64>, peer: Option<IpAddr>) {
        upsert(&mut lock(&self.services), service, endpoint, expires, peer);
    }

    /// Reads the stored registrations: live ones are added or renewed,
    /// registrations no longer stored are dropped (deregistered through
    /// another coordinator), and expired ones are removed from the store.
    /// A read that raced a registration or deregistration through this
    /// registry is not applied (the next load is): it could undo it.
    pub async fn load(&self) -> Result<()> {
        let changes = self.changes.load(Ordering::SeqCst);
        let stored = self.store.endpoints().await?;
        let now = self.clock.now_ms();
        let live: Vec<Registration> = stored.into_iter().filter(|r| r.expires_ms > now).collect();
        {
            let mut services = lock(&self.services);
            if self.changes.load(Ordering::SeqCst) != changes {
                return Ok(());
            }
            // Static entries stay; registrations are what the store holds
            // (an instance's down mark is kept across the reload).
            for (name, list) in services.iter_mut() {
                list.retain(|i| {
                    i.expires.is_none() || live.iter().any(|r| &r.service == name && r.endpoint == i.endpoint)
                });
            }
            for r in &live {
                upsert(&mut services, &r.service, &r.endpoint, Some(r.expires_ms), None);
            }
        }
        self.prune();
        self.store.remove_expired_endpoints(now).await?;
        Ok(())
    }

    /// Registers or renews `endpoint` for `service` with a lease of `ttl_ms`
    /// (0 = default), durably. Returns the lease granted. `quota` limits how
    /// many registrations the caller may hold ([`Quota`]).
    pub async fn register(&self, service: &str, endpoint: &str, ttl_ms: u64, quota: Quota) -> Result<Duration> {
        validate::service_name("service", service)?;
        parse_endpoint(endpoint)?;
        self.check_scheme(endpoint)?;
        let ttl = if ttl_ms == 0 { fixed::DEFAULT_LEASE_MS } else { ttl_ms };
        if !(fixed::MIN_LEASE_MS..=fixed::MAX_LEASE_MS).contains(&ttl) {
            return Err(Error::invalid(format!(
                "ttl_ms {ttl} is out of range; allowed are {}..={} (or 0 for {})",
                fixed::MIN_LEASE_MS,
                fixed::MAX_LEASE_MS,
                fixed::DEFAULT_LEASE_MS
            )));
        }
        self.prune();
        {
            let services = lock(&self.services);
            let known = services.get(service);
            let renewal = known.is_some_and(|list| list.iter().any(|i| i.endpoint == endpoint));
            if let Quota::PerPeer(peer) = quota
                && !renewal
            {
                let held = services.values().flatten().filter(|i| i.expires.is_some() && i.peer == Some(peer)).count();
                if held >= fixed::MAX_REGISTRATIONS_PER_PEER {
                    return Err(Error::LimitExceeded(format!(
                        "peer {peer} holds {held} registrations; with no --policy one peer address may hold at most {} (give --policy for identities and their quotas)",
                        fixed::MAX_REGISTRATIONS_PER_PEER
                    )));
                }
            }
            if known.is_none() && services.len() >= fixed::MAX_SERVICES {
                return Err(Error::LimitExceeded(format!(
                    "{} services are registered; the limit is {}",
                    services.len(),
                    fixed::MAX_SERVICES
                )));
            }
            if let Some(list) = known
                && !list.iter().any(|i| i.endpoint == endpoint)
            {
                let registered = list.iter().filter(|i| i.expires.is_some()).count();
                if let Quota::PerIdentity(quota) = quota
                    && registered >= quota
                {
                    return Err(Error::LimitExceeded(format!(
                        "identity {service:?} has {registered} endpoints registered; its quota is {quota} (max_endpoints_per_identity in the policy)"
                    )));
                }
                if list.len() >= fixed::MAX_INSTANCES_PER_SERVICE {
                    return Err(Error::LimitExceeded(format!(
                        "service {service:?} has {} instances registered; the limit is {}",
                        list.len(),
                        fixed::MAX_INSTANCES_PER_SERVICE
                    )));
                }
            }
        }
        let expires_ms = self.clock.now_ms().saturating_add(ttl as i64);
        let registration = Registration { service: service.to_string(), endpoint: endpoint.to_string(), expires_ms };
        // Counted before and after, so a load overlapping any of it skips.
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.store.put_endpoint(&registration).await?;
        let peer = match quota {
            Quota::PerPeer(peer) => Some(peer),
            _ => None,
        };
        self.upsert(service, endpoint, Some(expires_ms), peer);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(Duration::from_millis(ttl))
    }

    /// Removes a registered instance, durably. Static instances stay.
    pub async fn deregister(&self, service: &str, endpoint: &str) -> Result<bool> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        let stored = self.store.remove_endpoint(service, endpoint).await?;
        let removed = {
            let mut services = lock(&self.services);
            match services.get_mut(service) {
                Some(list) => {
                    let before = list.len();
                    list.retain(|i| i.expires.is_none() || i.endpoint != endpoint);
                    before != list.len()
                }
                None => false,
            }
        };
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.prune();
        Ok(stored || removed)
    }

    /// Drops expired instances, services left without instances, and
    /// channels no instance uses, so registrations cannot pile up.
    fn prune(&self) {
        let now = self.clock.now_ms();
        let mut services = lock(&self.services);
        for list in services.values_mut() {
            list.retain(|i| i.expires.is_none_or(|e| e > now));
        }
        services.retain(|_, list| !list.is_empty());
        let mut channels = lock(&self.channels);
        channels.retain(|(service, ep), _| services.get(service).is_some_and(|l| l.iter().any(|i| &i.endpoint == ep)));
    }

    /// Every known instance, ordered by service and endpoint; expired leases
    /// are dropped on the way.
    pub fn list(&self, service: Option<&str>) -> Vec<EndpointInfo> {
        let now_ms = self.clock.now_ms();
        let mut services = lock(&self.services);
        let mut out = Vec::new();
        for (name, list) in services.iter_mut() {
            list.retain(|i| i.expires.is_none_or(|e| e > now_ms));
            if service.is_some_and(|s| s != name) {
                continue;
            }
            out.extend(list.iter().map(|i| EndpointInfo {
                service: name.clone(),
                endpoint: i.endpoint.clone(),
                from_config: i.expires.is_none(),
                expires_in: i.expires.map(|e| Duration::from_millis(e.saturating_sub(now_ms).max(0) as u64)),
                healthy: i.failures == 0,
                consecutive_failures: i.failures,
            }));
        }
        out.sort_by(|a, b| (&a.service, &a.endpoint).cmp(&(&b.service, &b.endpoint)));
        out
    }

    /// An instance of `service` to call, with its channel: a healthy one in
    /// rotation, else the one that comes back soonest.
    pub fn pick(&self, service: &str) -> Option<(String, Channel)> {
        let now = Instant::now();
        let now_ms = self.clock.now_ms();
        let endpoint = {
            let mut services = lock(&self.services);
            let list = services.get_mut(service)?;
            list.retain(|i| i.expires.is_none_or(|e| e > now_ms));
            let healthy: Vec<&Instance> = list.iter().filter(|i| i.down_until.is_none_or(|d| d <= now)).collect();
            if healthy.is_empty() {
                list.iter().min_by_key(|i| i.down_until)?.endpoint.clone()
            } else {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                healthy[n % healthy.len()].endpoint.clone()
            }
        };
        let channel = self.channel(service, &endpoint)?;
        Some((endpoint, channel))
    }

    fn channel(&self, service: &str, endpoint: &str) -> Option<Channel> {
        let key = (service.to_string(), endpoint.to_string());
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(&key) {
            return Some(c.clone());
        }
        let channel = match &self.tls {
            Some(tls) if tls.delivers_over_tls() => {
                // The connector does TLS itself (tonic would wrap an https
                // URI in its own TLS, which cannot check the identity).
                let plain = endpoint.replacen("https://", "http://", 1);
                let ep = parse_endpoint(&plain).ok()?.connect_timeout(self.connect_timeout);
                ep.connect_with_connector_lazy(connector(tls.clone(), service))
            }
            _ => parse_endpoint(endpoint).ok()?.connect_timeout(self.connect_timeout).tcp_nodelay(true).connect_lazy(),
        };
        channels.insert(key, channel.clone());
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

/// Connects to a participant of `service` over TLS, with the current TLS
/// material at each connection (so rotated certificates are used as soon
/// as they load).
fn connector(
    tls: Arc<Tls>,
    service: &str,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let service = service.to_string();
    tower::service_fn(move |uri: http::Uri| {
        let (tls, service) = (tls.clone(), service.clone());
        async move {
            use std::io::{Error as IoError, ErrorKind};
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let config = tls
                .participant_config(&service)
                .ok_or_else(|| IoError::other("no TLS client configuration for phase-2 calls"))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| IoError::new(ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// On a store shared by several coordinators, reads the registrations
/// again every [`REFRESH`] until `shutdown`; on a single-process store
/// every registration comes through this coordinator, so there is nothing
/// to do.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    if registry.store.node().is_none() {
        return;
    }
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REFRESH) => {}
        }
        if let Err(e) = registry.load().await {
            warn!(cause = %e, "cannot read the registrations; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clock::ManualClock;
    use crate::store::memory::MemStore;

    fn on(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Registry {
        match Registry::new(&["orders=http://127.0.0.1:7001".into()], Duration::from_secs(1), None, store, clock) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn reg() -> Registry {
        on(Arc::new(MemStore::new()), Arc::new(ManualClock::at(1_000_000)))
    }

    #[test]
    fn static_entries_are_validated() {
        for bad in ["orders", "orders=127.0.0.1:1", "or ders=http://127.0.0.1:1", "orders=http://host"] {
            let (store, clock) = (Arc::new(MemStore::new()), Arc::new(ManualClock::at(0)));
            assert!(
                Registry::new(&[bad.into()], Duration::from_secs(1), None, store, clock).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[tokio::test]
    async fn register_renew_deregister_and_rotation() {
        let r = reg();
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000, Quota::Unlimited).await.is_ok());
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000, Quota::Unlimited).await.is_ok(), "renewal");
        assert_eq!(r.list(Some("orders")).len(), 2);
        let picks: std::collections::HashSet<String> =
            (0..4).filter_map(|_| r.pick("orders").map(|(e, _)| e)).collect();
        assert_eq!(picks.len(), 2, "rotates across instances");
        assert!(r.deregister("orders", "http://127.0.0.1:7002").await.unwrap_or(false));
        assert!(!r.deregister("orders", "http://127.0.0.1:7001").await.unwrap_or(true), "static entries stay");
        assert_eq!(r.list(None).len(), 1);
        assert!(r.pick("nobody").is_none());
    }

    /// Open mode: one peer address cannot fill the registry (it could
    /// hold every service slot for the lease, across a restart).
    #[tokio::test]
    async fn in_open_mode_one_peer_holds_a_bounded_number_of_registrations() {
        let r = reg();
        let (a, b) = (Quota::PerPeer([10, 0, 0, 1].into()), Quota::PerPeer([10, 0, 0, 2].into()));
        for i in 0..fixed::MAX_REGISTRATIONS_PER_PEER {
            let ok = r.register(&format!("svc{i}"), &format!("http://127.0.0.1:{}", 10_000 + i), 5_000, a).await;
            assert!(ok.is_ok(), "{i}: {ok:?}");
        }
        match r.register("one-more", "http://127.0.0.1:9999", 5_000, a).await {
            Err(Error::LimitExceeded(msg)) => {
                assert!(msg.contains("peer 10.0.0.1 holds 64 registrations") && msg.contains("--policy"), "{msg}")
            }
            other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
        }
        assert!(r.register("svc0", "http://127.0.0.1:10000", 5_000, a).await.is_ok(), "renewing stays allowed");
        assert!(r.register("one-more", "http://127.0.0.1:9999", 5_000, b).await.is_ok(), "another peer has room");
        assert!(r.deregister("svc0", "http://127.0.0.1:10000").await.unwrap_or(false));
        assert!(r.register("one-more", "http://127.0.0.1:9998", 5_000, a).await.is_ok(), "room again");
    }

    #[tokio::test]
    async fn an_instance_that_fails_is_skipped_while_another_is_up() {
        let r = reg();
        assert!(r.register("orders", "http://127.0.0.1:7002", 5_000, Quota::Unlimited).await.is_ok());
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
            assert!(
                r.register("many", &format!("http://127.0.0.1:{}", 10_000 + i), 5_000, Quota::Unlimited).await.is_ok()
            );
        }
        let over = r.register("many", "http://127.0.0.1:9999", 5_000, Quota::Unlimited).await;
        assert!(matches!(over, Err(Error::LimitExceeded(_))), "{over:?}");
        assert!(
            r.register("many", "http://127.0.0.1:10000", 5_000, Quota::Unlimited).await.is_ok(),
            "renewing stays allowed"
        );
        let _ = r.pick("many");
        assert_eq!(lock(&r.channels).len(), 1, "one pick, one channel");
        for i in 0..fixed::MAX_INSTANCES_PER_SERVICE {
            assert!(r.deregister("many", &format!("http://127.0.0.1:{}", 10_000 + i)).await.unwrap_or(false));
        }
        assert!(r.register("many", "http://127.0.0.1:9999", 5_000, Quota::Unlimited).await.is_ok(), "room again");
        assert_eq!(lock(&r.channels).len(), 0, "channels of removed instances dropped");
    }

    #[tokio::test]
    async fn bad_registrations_are_refused() {
        let r = reg();
        assert!(r.register("", "http://127.0.0.1:1", 0, Quota::Unlimited).await.is_err());
        assert!(r.register("a", "ftp://x:1", 0, Quota::Unlimited).await.is_err());
        assert!(r.register("a", "http://127.0.0.1:1", 10, Quota::Unlimited).await.is_err(), "lease too short");
        assert!(r.register("a", "http://127.0.0.1:1", 0, Quota::Unlimited).await.is_ok());
    }

    #[tokio::test]
    async fn registrations_are_stored_and_outlive_the_registry() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let clock = Arc::new(ManualClock::at(1_000_000));
        let first = on(store.clone(), clock.clone());
        assert!(first.register("bank", "http://127.0.0.1:7100", 5_000, Quota::Unlimited).await.is_ok());
        assert!(first.register("bank", "http://127.0.0.1:7101", 60_000, Quota::Unlimited).await.is_ok());
        drop(first);

        // A restart: a new registry on the same store.
        let second = on(store.clone(), clock.clone());
        assert!(second.pick("bank").is_none(), "nothing before loading");
        assert!(second.load().await.is_ok());
        assert_eq!(second.list(Some("bank")).len(), 2, "both registrations back");
        // The short lease runs out: dropped here and from the store.
        clock.advance(10_000);
        assert!(second.load().await.is_ok());
        let left: Vec<String> = second.list(Some("bank")).into_iter().map(|e| e.endpoint).collect();
        assert_eq!(left, vec!["http://127.0.0.1:7101".to_string()]);
        assert_eq!(store.endpoints().await.map(|e| e.len()).unwrap_or(0), 1, "expired one removed from the store");
        // Deregistered through another coordinator: gone at the next load.
        assert!(store.remove_endpoint("bank", "http://127.0.0.1:7101").await.unwrap_or(false));
        assert!(second.load().await.is_ok());
        assert!(second.pick("bank").is_none());
        assert_eq!(second.list(None).len(), 1, "the static entry stays");
    }

    /// A store whose `endpoints` answers what it read before a pause, so a
    /// load can be made to overlap a registration.
    struct Paused {
        inner: MemStore,
        read: tokio::sync::Notify,
        go: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl Store for Paused {
        async fn create_txn(&self, t: &crate::model::TxnRecord) -> Result<()> {
            self.inner.create_txn(t).await
        }
        async fn update_txn(&self, t: &crate::model::TxnRecord, p: Option<crate::model::PartialId>) -> Result<()> {
            self.inner.update_txn(t, p).await
        }
        async fn append(&self, t: &crate::model::TxnRecord, b: crate::store::AppendBatch<'_>) -> Result<()> {
            self.inner.append(t, b).await
        }
        async fn delete_txn(&self, t: &crate::model::TxnRecord) -> Result<()> {
            self.inner.delete_txn(t).await
        }
        async fn get_txn(&self, id: crate::model::TxnId) -> Result<Option<crate::model::TxnRecord>> {
            self.inner.get_txn(id).await
        }
        async fn find_partial(&self, p: crate::model::PartialId) -> Result<Option<crate::model::TxnId>> {
            self.inner.find_partial(p).await
        }
        async fn find_receipt(
            &self,
            p: crate::model::PartialId,
            k: &str,
        ) -> Result<Option<crate::model::AppendReceipt>> {
            self.inner.find_receipt(p, k).await
        }
        async fn read_topic(
            &self,
            p: crate::model::PartialId,
            from: u64,
            limit: usize,
        ) -> Result<Vec<crate::model::CommandRecord>> {
            self.inner.read_topic(p, from, limit).await
        }
        async fn unfinished(&self, a: Option<crate::model::TxnId>, l: usize) -> Result<Vec<crate::model::TxnId>> {
            self.inner.unfinished(a, l).await
        }
        async fn due_deadlines(&self, n: i64, l: usize) -> Result<(Vec<crate::model::TxnId>, Option<i64>)> {
            self.inner.due_deadlines(n, l).await
        }
        async fn due_deliveries(&self, u: i64, l: usize) -> Result<Vec<crate::model::TxnId>> {
            self.inner.due_deliveries(u, l).await
        }
        async fn list(&self, q: &crate::store::ListQuery) -> Result<crate::store::ListPage> {
            self.inner.list(q).await
        }
        async fn count_unfinished(&self) -> Result<Vec<(crate::model::TxnState, u64)>> {
            self.inner.count_unfinished().await
        }
        async fn collectable(&self, u: i64, l: usize) -> Result<(Vec<crate::model::TxnRecord>, Option<i64>)> {
            self.inner.collectable(u, l).await
        }
        async fn put_endpoint(&self, r: &Registration) -> Result<()> {
            self.inner.put_endpoint(r).await
        }
        async fn remove_endpoint(&self, s: &str, e: &str) -> Result<bool> {
            self.inner.remove_endpoint(s, e).await
        }
        async fn endpoints(&self) -> Result<Vec<Registration>> {
            let read = self.inner.endpoints().await;
            self.read.notify_one();
            self.go.notified().await;
            read
        }
        async fn remove_expired_endpoints(&self, until: i64) -> Result<usize> {
            self.inner.remove_expired_endpoints(until).await
        }
    }

    #[tokio::test]
    async fn a_load_that_overlaps_a_registration_does_not_undo_it() {
        let store = Arc::new(Paused {
            inner: MemStore::new(),
            read: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
        });
        let r = Arc::new(on(store.clone(), Arc::new(ManualClock::at(1_000_000))));
        let loading = tokio::spawn({
            let r = r.clone();
            async move { r.load().await }
        });
        store.read.notified().await; // the load read the store: no registration yet
        assert!(r.register("bank", "http://127.0.0.1:7100", 60_000, Quota::Unlimited).await.is_ok());
        store.go.notify_one();
        assert!(matches!(loading.await, Ok(Ok(()))));
        assert_eq!(r.pick("bank").map(|(e, _)| e).as_deref(), Some("http://127.0.0.1:7100"), "still registered");
    }
}
