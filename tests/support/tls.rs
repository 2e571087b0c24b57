//! Certificates made at test time (rcgen): a CA with a server certificate for
//! `localhost` and 127.0.0.1 and a client certificate, and a second CA with its own client,
//! which the daemon must refuse.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files, under one directory.
pub struct Pki {
    /// Where they are.
    pub dir: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().expect("ca key");
    let cert = params.self_signed(&key).expect("ca cert");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf params");
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Makes every file under `dir`.
    pub fn make(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let (ca_pem, issuer) = ca("hearth test CA");
        let (server, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client, client_key) = leaf(
            &["control-plane"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let (other_ca, other_issuer) = ca("another CA");
        let (other, other_key) = leaf(
            &["intruder"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_issuer,
        );
        for (name, text) in [
            ("ca.pem", ca_pem),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
            ("other-ca.pem", other_ca),
            ("other-client.pem", other),
            ("other-client.key", other_key),
        ] {
            std::fs::write(dir.join(name), text).expect("write pki file");
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// A file's path.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file's bytes.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read pki file")
    }

    /// The `[api]` keys that serve TCP with mutual TLS on a free loopback port.
    pub fn api_keys(&self) -> String {
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("ca.pem").display(),
        )
    }

    /// A client with this CA's client certificate (`other` = false) or the other CA's.
    pub fn client(&self, other: bool) -> hearth::client::TlsClient {
        let (cert, key) = if other {
            ("other-client.pem", "other-client.key")
        } else {
            ("client.pem", "client.key")
        };
        hearth::client::TlsClient {
            ca: self.read("ca.pem"),
            cert: self.read(cert),
            key: self.read(key),
            server_name: None,
        }
    }
}

/// Adds `keys` to the `[api]` table of a config's text.
pub fn with_api_keys(config: String, keys: &str) -> String {
    config.replacen("[api]\n", &format!("[api]\n{keys}"), 1)
}
