//! Registering a participant's endpoint with the coordinator.
//!
//! [`Registration::start`] registers once (so a wrong coordinator address
//! fails at start-up, loudly), then renews the lease at a third of its
//! length in the background. [`Registration::stop`] deregisters, so the
//! coordinator stops calling an instance that is going away.

use std::time::Duration;

use tcc_proto::v1::{self, registry_client::RegistryClient};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::error::Result;

/// A live registration.
pub struct Registration {
    client: RegistryClient<Channel>,
    service: String,
    endpoint: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// Registers `endpoint` (e.g. `http://127.0.0.1:7001`) as an instance of
    /// `service`, with a lease of `ttl`, and keeps it renewed.
    pub async fn start(coordinator: Channel, service: &str, endpoint: &str, ttl: Duration) -> Result<Self> {
        let mut client = RegistryClient::new(coordinator);
        let req =
            v1::RegisterRequest { service: service.into(), endpoint: endpoint.into(), ttl_ms: ttl.as_millis() as u64 };
        let granted = client.register(req.clone()).await?.into_inner().ttl_ms;
        let stop = CancellationToken::new();
        let (mut renew, token) = (client.clone(), stop.clone());
        let every = Duration::from_millis((granted / 3).max(100));
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = token.cancelled() => return,
                }
                if let Err(e) = renew.register(req.clone()).await {
                    tracing::warn!(service = %req.service, cause = %e, "registration renewal failed; retrying");
                }
            }
        });
        tracing::info!(%service, %endpoint, ttl_ms = granted, "registered with the coordinator");
        Ok(Registration { client, service: service.into(), endpoint: endpoint.into(), stop, task: Some(task) })
    }

    /// Stops renewing and deregisters.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let req = v1::DeregisterRequest { service: self.service.clone(), endpoint: self.endpoint.clone() };
        if let Err(e) = self.client.deregister(req).await {
            tracing::warn!(service = %self.service, cause = %e, "deregistration failed; the lease will expire");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
