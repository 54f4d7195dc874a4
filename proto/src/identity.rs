//! Who a certificate names: the one rule the coordinator and the domain SDK
//! share for turning a verified X.509 certificate into an identity.
//!
//! The identity is, in this order:
//! 1. the last path segment of the certificate's first `spiffe://` URI
//!    subject alternative name (`spiffe://shop.example/orders` and
//!    `spiffe://shop.example/ns/prod/sa/orders` both name `orders`);
//! 2. otherwise its subject Common Name.
//!
//! The result must be a valid service name (1..=128 of
//! `[A-Za-z0-9._-]`), the same rule as the names in `BeginRequest`, so that
//! an identity can be compared with the service a request is about. This
//! module does not verify anything: callers pass only certificates that
//! their TLS stack has already verified against the trusted CA.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The longest identity (and service name).
pub const MAX_IDENTITY: usize = 128;

/// The identity a DER-encoded certificate names, or why it names none.
pub fn of_certificate(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let spiffe = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
                _ => None,
            })
        });
    let name = match spiffe {
        Some(uri) => {
            let path = uri["spiffe://".len()..].split_once('/').map(|(_, path)| path).unwrap_or("");
            let last = path.rsplit('/').next().unwrap_or("");
            if last.is_empty() {
                return Err(format!("the SPIFFE ID {uri:?} has no path naming a service"));
            }
            last.to_string()
        }
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .ok_or("the certificate has neither a spiffe:// URI SAN nor a Common Name")?
            .as_str()
            .map_err(|e| format!("unreadable Common Name: {e}"))?
            .to_string(),
    };
    check(&name)?;
    Ok(name)
}

/// Checks that `name` can be an identity (and a service name).
pub fn check(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IDENTITY {
        return Err(format!("identity {name:?} must be 1..={MAX_IDENTITY} bytes"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("identity {name:?} contains {c:?}; allowed are ASCII letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}
