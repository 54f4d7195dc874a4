//! TLS material: the coordinator's certificate and key, the CA that signs
//! every identity, and the rustls configurations built from them, for the
//! gRPC server and for phase-2 calls to participants. rustls with the
//! *ring* provider; no OpenSSL.
//!
//! Invariants:
//! * The files are read again whenever their content changes ([`Tls::reload_if_changed`],
//!   called every [`RELOAD_EVERY`]). New connections use the new material;
//!   open ones keep theirs. A change that does not load (a half-written
//!   file, a key that does not match) keeps the previous material and is
//!   logged; nothing is ever served without a certificate.
//! * With a client CA, the server requires a client certificate signed by
//!   it (unless bearer tokens are configured too, in which case a client
//!   may present a token instead; a certificate it does present must still
//!   verify). Expired and unknown-CA certificates fail the handshake.
//! * A phase-2 call over TLS goes only to a server whose certificate is
//!   signed by the CA *and* names the service being delivered to
//!   ([`tcc_proto::identity`]); that check replaces the host-name check, so
//!   an address taken over by someone else receives nothing. The
//!   coordinator presents its own certificate as a client certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Where the TLS material is.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The coordinator's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM, one or more certificates) that signs client and
    /// participant certificates; `None` for server-only TLS.
    pub client_ca: Option<PathBuf>,
}

/// What one load of the files produced.
struct Material {
    server: Arc<ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Option<Arc<RootCertStore>>,
}

/// The live TLS material; see the module docs.
pub struct Tls {
    files: TlsFiles,
    /// A client may present a bearer token instead of a certificate.
    optional_client_cert: bool,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Material>>,
    /// The files' content when last loaded (or last found not to load).
    seen: Mutex<Vec<u8>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the files; the error names the file and what is wrong with it.
    pub fn load(files: TlsFiles, optional_client_cert: bool) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = read_all(&files)?;
        let material = build(&files, optional_client_cert, &provider)?;
        Ok(Tls {
            files,
            optional_client_cert,
            provider,
            current: RwLock::new(Arc::new(material)),
            seen: Mutex::new(seen),
        })
    }

    fn material(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// An acceptor with the current material, for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.material().server.clone())
    }

    /// Whether phase-2 calls go over TLS (a client CA is configured to
    /// verify participants with).
    pub fn delivers_over_tls(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// A client configuration for phase-2 calls to `service`: verifies that
    /// the server's certificate is signed by the CA and names `service`,
    /// and presents the coordinator's certificate. `None` without a CA.
    pub fn participant_config(&self, service: &str) -> Option<Arc<ClientConfig>> {
        let m = self.material();
        let roots = m.roots.clone()?;
        let verifier = Arc::new(ParticipantVerifier {
            roots,
            service: service.to_string(),
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
            .ok()?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Some(Arc::new(config))
    }

    /// Reads the files again if their content changed since the last look.
    /// `Ok(true)` when new material is in use; an error (the old material
    /// stays) when the new content does not load.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = read_all(&self.files)?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let material = build(&self.files, self.optional_client_cert, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        Ok(true)
    }
}

/// Every file's bytes, concatenated with their lengths: what a change is
/// detected on.
fn read_all(files: &TlsFiles) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for path in [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()].into_iter().flatten() {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend(bytes);
    }
    Ok(out)
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn build(files: &TlsFiles, optional_client_cert: bool, provider: &Arc<CryptoProvider>) -> Result<Material, String> {
    let chain = certificates(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("--tls-key {}: no usable PEM private key: {e}", files.key.display()))?;
    let roots = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "--tls-client-ca")? {
                roots.add(cert).map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            Some(Arc::new(roots))
        }
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            let verifier = if optional_client_cert { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("--tls-client-ca: {e}"))?)
        }
    };
    let mut server = builder.with_single_cert(chain.clone(), key.clone_key()).map_err(|e| {
        let hint = if e.to_string().contains("UnsupportedCertVersion") {
            " (an X.509 v1 certificate, as a plain `openssl x509 -req` makes: TLS needs version 3, with the extensions SECURITY.md lists under \"What a certificate must hold\"; coordinator/ops/make-certs.sh makes such certificates)"
        } else {
            ""
        };
        format!(
            "--tls-cert {} and --tls-key {} do not make a usable pair: {e}{hint}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    // gRPC over HTTP/2, and /metrics over HTTP/1.1.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Material { server: Arc::new(server), chain, key, roots })
}

/// The identity a verified peer certificate chain names (its first, the
/// end-entity certificate), or why none.
pub fn identity_of(chain: Option<&[CertificateDer<'_>]>) -> Option<Result<String, String>> {
    let end_entity = chain?.first()?;
    Some(tcc_proto::identity::of_certificate(end_entity))
}

/// Verifies a participant's server certificate: signed by the CA, and
/// naming the service the call is for. See the module docs.
#[derive(Debug)]
struct ParticipantVerifier {
    roots: Arc<RootCertStore>,
    service: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ParticipantVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match tcc_proto::identity::of_certificate(end_entity) {
            Ok(name) if name == self.service => Ok(ServerCertVerified::assertion()),
            Ok(name) => {
                tracing::warn!(
                    service = %self.service,
                    certificate_names = %name,
                    "refusing a phase-2 connection: the server's certificate belongs to another service, so it gets no commands (is the address taken over?)"
                );
                Err(rustls::Error::General(format!(
                    "the participant's certificate names {name:?}, not the service {:?} being delivered to",
                    self.service
                )))
            }
            Err(why) => Err(rustls::Error::General(format!("the participant's certificate names no identity: {why}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
