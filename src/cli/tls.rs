//! The TLS options of the commands that open tcp connections (`send`, `recv`).

use std::path::PathBuf;

use tensorferry::TlsConfig;

/// TLS for tcp: with any of these, every tcp connection of the command is
/// TLS 1.3, and a peer without TLS is refused.
#[derive(Debug, Clone, clap::Args)]
#[command(
    next_help_heading = "TLS (with any of these, every tcp connection is TLS 1.3, and a peer without TLS is refused)"
)]
pub struct TlsArgs {
    /// This side's certificate chain (PEM file, its own certificate first,
    /// then any intermediates), with --tls-key. A listener (--listen
    /// tcp://…) needs it to speak TLS; a dialer shows it to a listener that
    /// requires client certificates (--tls-client-ca there).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM file: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// The CA certificates (PEM file) the listener's certificate must be
    /// signed by, for a dialer (--to or --from tcp://…): with it, this side
    /// dials with TLS and refuses a listener whose certificate no such CA
    /// signed or that is not for the host dialed. No system roots are used.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// Mutual TLS, for a listener: require every dialer to present a
    /// certificate signed by a CA in this PEM file (dialers give theirs
    /// with --tls-cert and --tls-key); one without is refused.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// For a dialer: the name the listener's certificate must hold, when it
    /// is not the host of the address dialed (e.g. dialing 10.0.0.2 whose
    /// certificate names gpu-box.internal) [default: the host dialed].
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The node's TLS settings; `None` without any TLS option (plain tcp).
    pub fn config(&self) -> Option<TlsConfig> {
        let TlsArgs {
            tls_cert,
            tls_key,
            tls_ca,
            tls_client_ca,
            tls_server_name,
        } = self;
        if tls_cert.is_none() && tls_ca.is_none() {
            return None;
        }
        let mut config = TlsConfig::new();
        if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
            config = config.cert_file(cert).key_file(key);
        }
        if let Some(ca) = tls_ca {
            config = config.ca_file(ca);
        }
        if let Some(ca) = tls_client_ca {
            config = config.client_ca_file(ca);
        }
        if let Some(name) = tls_server_name {
            config = config.server_name(name);
        }
        Some(config)
    }
}
