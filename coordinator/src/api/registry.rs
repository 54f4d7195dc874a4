//! `tcc.v1.Registry`: where participant services listen.

use std::sync::Arc;

use tcc_proto::v1::{self, registry_server};
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::clock::Clock;
use crate::delivery::registry::{Quota, Registry};

/// The Registry service.
pub struct RegistryApi {
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    access: Arc<Access>,
}

impl RegistryApi {
    /// A service over `registry`; `clock` turns lease durations into the
    /// wall times `ListEndpoints` reports; `access` decides who may call.
    pub fn new(registry: Arc<Registry>, clock: Arc<dyn Clock>, access: Arc<Access>) -> Self {
        RegistryApi { registry, clock, access }
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryApi {
    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        const RPC: &str = "Registry.Register";
        let caller = self.access.caller(&request, RPC)?;
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        self.access.service(&caller, RPC, &req.service, false)?;
        let quota = match (self.access.endpoint_quota(&caller), peer) {
            (Some(quota), _) => Quota::PerIdentity(quota),
            (None, Some(peer)) if !self.access.is_enforced() => Quota::PerPeer(peer),
            (None, _) => Quota::Unlimited,
        };
        let ttl =
            self.registry.register(&req.service, &req.endpoint, req.ttl_ms, quota).await.map_err(|e| match e {
                e @ crate::error::Error::LimitExceeded(_) => self.access.refuse(&caller, RPC, e),
                e => e,
            })?;
        tracing::debug!(service = %req.service, endpoint = %req.endpoint, ttl_ms = ttl.as_millis() as u64, "endpoint registered");
        Ok(Response::new(v1::RegisterResponse { ttl_ms: ttl.as_millis() as u64 }))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let caller = self.access.caller(&request, "Registry.Deregister")?;
        let req = request.into_inner();
        self.access.service(&caller, "Registry.Deregister", &req.service, true)?;
        let removed = self.registry.deregister(&req.service, &req.endpoint).await?;
        tracing::info!(service = %req.service, endpoint = %req.endpoint, removed, "endpoint deregistered");
        Ok(Response::new(v1::DeregisterResponse { removed }))
    }

    async fn list_endpoints(
        &self,
        request: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        let caller = self.access.caller(&request, "Registry.ListEndpoints")?;
        self.access.admin(&caller, "Registry.ListEndpoints")?;
        let req = request.into_inner();
        let now = self.clock.now_ms();
        let service = (!req.service.is_empty()).then_some(req.service.as_str());
        let endpoints = self
            .registry
            .list(service)
            .into_iter()
            .map(|e| v1::Endpoint {
                service: e.service,
                endpoint: e.endpoint,
                from_config: e.from_config,
                expires_unix_ms: e.expires_in.map(|d| now + d.as_millis() as i64).unwrap_or(0),
                healthy: e.healthy,
                consecutive_failures: e.consecutive_failures,
            })
            .collect();
        Ok(Response::new(v1::ListEndpointsResponse { endpoints }))
    }
}
