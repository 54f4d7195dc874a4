//! A throwaway certificate authority for the demo (`shop-demo --tls`) and
//! the tests: a CA, and certificates it signs that name a service by a
//! SPIFFE-style URI SAN (`spiffe://tcc.demo/NAME`, see
//! `tcc_proto::identity`), valid for `localhost` and `127.0.0.1`, for both
//! server and client use. Never for production: keys are written as
//! plain PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

/// The trust domain of the demo's SPIFFE IDs.
pub const TRUST_DOMAIN: &str = "tcc.demo";

/// A CA that issues certificates.
pub struct Pki {
    ca: Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, as PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

/// How to issue a certificate.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Already expired (valid in 2000 only).
    pub expired: bool,
    /// Name the identity by Common Name only (no URI SAN).
    pub common_name_only: bool,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Pki> {
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = params.self_signed(&ca_key)?;
        Ok(Pki { ca, ca_key })
    }

    /// The CA certificate (PEM), to trust.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate naming `identity`.
    pub fn issue(&self, identity: &str, options: &Options) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        if !options.common_name_only {
            params.subject_alt_names.push(SanType::URI(format!("spiffe://{TRUST_DOMAIN}/{identity}").try_into()?));
        }
        params.distinguished_name.push(DnType::CommonName, identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if options.expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// Issues a certificate for `identity` and writes `DIR/IDENTITY.pem`
    /// and `DIR/IDENTITY.key`; returns their paths.
    pub fn write(&self, dir: &Path, identity: &str, options: &Options) -> anyhow::Result<(PathBuf, PathBuf)> {
        let issued = self.issue(identity, options)?;
        let (cert, key) = (dir.join(format!("{identity}.pem")), dir.join(format!("{identity}.key")));
        std::fs::write(&cert, issued.cert)?;
        std::fs::write(&key, issued.key)?;
        Ok((cert, key))
    }
}
