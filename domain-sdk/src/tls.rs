//! Mutual TLS for a domain service: one certificate and key for the
//! service (it names the service, see [`tcc_proto::identity`]), and the CA
//! that signs every identity of the deployment.
//!
//! * [`Tls::endpoint`]: a channel to the coordinator (or any other service)
//!   that verifies the server against the CA and presents the service's
//!   certificate;
//! * [`Tls::server`]: the server side, which requires a client certificate
//!   signed by the CA;
//! * [`ParticipantService::only_from`](crate::ParticipantService::only_from):
//!   phase-2 calls are accepted only from the coordinator's identity,
//!   since a Commit carries the commands to apply.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// A service's TLS material (PEM).
#[derive(Clone, Debug)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
}

impl Tls {
    /// From PEM text: the certificate (chain), its key, and the CA.
    pub fn from_pem(cert: impl AsRef<[u8]>, key: impl AsRef<[u8]>, ca: impl AsRef<[u8]>) -> Self {
        Tls { identity: Identity::from_pem(cert, key), ca: Certificate::from_pem(ca) }
    }

    /// From PEM files; the error names the file.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Invalid(format!("cannot read {}: {e}", p.display())));
        Ok(Self::from_pem(read(cert)?, read(key)?, read(ca)?))
    }

    /// A client endpoint for `url` (`https://...`).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        if !url.starts_with("https://") {
            return Err(Error::Invalid(format!("{url:?}: with TLS, the URL must start with https://")));
        }
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone());
        Ok(Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Invalid(format!("{url:?}: {e}")))?
            .tls_config(config)?)
    }

    /// The server configuration: this service's certificate, and a client
    /// certificate signed by the CA required of every caller.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }
}

/// The identity of a request's verified client certificate, if any.
pub fn caller_identity<T>(request: &tonic::Request<T>) -> Option<std::result::Result<String, String>> {
    let certs = request.peer_certs()?;
    let first = certs.first()?;
    Some(tcc_proto::identity::of_certificate(first))
}
