//! `tcc.v1.Registry`: where participant services listen.

use std::sync::Arc;

use tcc_proto::v1::{self, registry_server};
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::delivery::registry::Registry;

/// The Registry service.
pub struct RegistryApi {
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
}

impl RegistryApi {
    /// A service over `registry`; `clock` turns lease durations into the
    /// wall times `ListEndpoints` reports.
    pub fn new(registry: Arc<Registry>, clock: Arc<dyn Clock>) -> Self {
        RegistryApi { registry, clock }
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryApi {
    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let req = request.into_inner();
        let ttl = self.registry.register(&req.service, &req.endpoint, req.ttl_ms).await?;
        tracing::debug!(service = %req.service, endpoint = %req.endpoint, ttl_ms = ttl.as_millis() as u64, "endpoint registered");
        Ok(Response::new(v1::RegisterResponse { ttl_ms: ttl.as_millis() as u64 }))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let req = request.into_inner();
        let removed = self.registry.deregister(&req.service, &req.endpoint).await?;
        tracing::info!(service = %req.service, endpoint = %req.endpoint, removed, "endpoint deregistered");
        Ok(Response::new(v1::DeregisterResponse { removed }))
    }

    async fn list_endpoints(
        &self,
        request: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
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
