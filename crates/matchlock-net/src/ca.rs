//! The per-sandbox certificate authority that lets the host terminate the guest's TLS.
//!
//! One CA key and certificate per sandbox (ECDSA P-256: generated in microseconds, where RSA
//! would cost a noticeable part of boot), one leaf key for all names, and a leaf certificate
//! per server name, signed on first use and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Errors while minting certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key or certificate generation failed.
    #[error("cannot generate certificate")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated certificate.
    #[error("cannot build TLS configuration")]
    Tls(#[from] rustls::Error),
}

/// Bound on cached per-name server configurations.
const MAX_CACHED_NAMES: usize = 1024;

/// A sandbox's CA.
pub struct CertAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    leaf_key: KeyPair,
    cache: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// A fresh CA, `CN=Sandbox MITM CA`, valid ten years.
    pub fn generate() -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Sandbox MITM CA");
        name.push(DnType::OrganizationName, "Sandbox MITM CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time_now();
        params.not_before = now - std::time::Duration::from_secs(86_400);
        params.not_after = now + std::time::Duration::from_secs(10 * 365 * 86_400);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer, leaf_key: KeyPair::generate()?, cache: Mutex::new(HashMap::new()) })
    }

    /// The CA certificate, PEM, for the guest's trust store.
    pub fn certificate_pem(&self) -> String {
        self.issuer.as_ref().pem()
    }

    /// A TLS server configuration presenting a certificate for `name` (a DNS name or an IP),
    /// offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, CaError> {
        if let Some(config) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(config.clone());
        }
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time_now();
        params.not_before = now - std::time::Duration::from_secs(86_400);
        params.not_after = now + std::time::Duration::from_secs(365 * 86_400);
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        let chain = vec![leaf.der().clone(), CertificateDer::from(self.issuer.as_ref().der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_NAMES {
            cache.clear();
        }
        cache.insert(name.to_owned(), config.clone());
        Ok(config)
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
