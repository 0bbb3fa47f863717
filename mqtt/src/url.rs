//! Broker URLs: `mqtt://host[:port]` and `mqtts://host[:port]` (the aliases `tcp://` and `ssl://`
//! that paho and EMQX users write are accepted too), IPv6 hosts in brackets. Pure: it names the
//! part that is wrong and what would be right, and never resolves a name.

/// A broker address parsed from a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS (`mqtts://`, `ssl://`) or plain TCP (`mqtt://`, `tcp://`).
    pub tls: bool,
    /// Host name or IP address, IPv6 without its brackets (what a socket connect takes).
    pub host: String,
    /// TCP port (default 8883 with TLS, 1883 without).
    pub port: u16,
}

/// Why a broker URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`, or a scheme that is not MQTT.
    #[error("broker URL {url:?}: the scheme must be mqtt:// or mqtts:// (tcp:// and ssl:// are accepted as aliases)")]
    Scheme {
        /// The URL as given.
        url: String,
    },
    /// Nothing where the host should be.
    #[error("broker URL {url:?}: the host is empty; write mqtts://broker.example:8883")]
    EmptyHost {
        /// The URL as given.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("broker URL {url:?}: the port {port:?} is not a number from 1 to 65535")]
    Port {
        /// The URL as given.
        url: String,
        /// The text where the port should be.
        port: String,
    },
    /// An IPv6 address without its closing bracket, or text after it that is not `:port`.
    #[error("broker URL {url:?}: an IPv6 host is written in brackets, e.g. mqtts://[::1]:8883")]
    Ipv6 {
        /// The URL as given.
        url: String,
    },
    /// Credentials, a path or a query in the URL.
    #[error("broker URL {url:?}: only scheme, host and port belong in it ({what} found); pass credentials with the broker credentials settings")]
    Extra {
        /// The URL as given.
        url: String,
        /// What was found.
        what: &'static str,
    },
}

impl BrokerUrl {
    /// Parse a broker URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let owned = || url.to_owned();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| UrlError::Scheme { url: owned() })?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtts" | "ssl" => true,
            "mqtt" | "tcp" => false,
            _ => return Err(UrlError::Scheme { url: owned() }),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(UrlError::Extra {
                url: owned(),
                what: "user information",
            });
        }
        if authority.contains(['/', '?', '#']) {
            return Err(UrlError::Extra {
                url: owned(),
                what: "a path or query",
            });
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| UrlError::Ipv6 { url: owned() })?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| UrlError::Ipv6 { url: owned() })?,
                    ),
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((_, p)) if p.contains(':') => return Err(UrlError::Ipv6 { url: owned() }),
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::EmptyHost { url: owned() });
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(UrlError::Port {
                        url: owned(),
                        port: p.to_owned(),
                    })
                }
            },
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> (bool, String, u16) {
        let b = BrokerUrl::parse(url).unwrap();
        (b.tls, b.host, b.port)
    }

    #[test]
    fn schemes_hosts_and_default_ports() {
        assert_eq!(
            ok("mqtt://127.0.0.1:1884"),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            ok("mqtts://broker.example"),
            (true, "broker.example".into(), 8883)
        );
        assert_eq!(
            ok("mqtt://broker.example/"),
            (false, "broker.example".into(), 1883)
        );
        assert_eq!(ok("ssl://b:8884"), (true, "b".into(), 8884));
        assert_eq!(ok("TCP://b"), (false, "b".into(), 1883));
        assert_eq!(ok("mqtts://[::1]:8883"), (true, "::1".into(), 8883));
        assert_eq!(ok("mqtts://[fe80::1]"), (true, "fe80::1".into(), 8883));
    }

    #[test]
    fn each_refusal_names_what_is_wrong() {
        let err = |u: &str| BrokerUrl::parse(u).unwrap_err();
        assert!(matches!(err("http://x"), UrlError::Scheme { .. }));
        assert!(matches!(err("broker:1883"), UrlError::Scheme { .. }));
        assert!(matches!(err("mqtt://:1"), UrlError::EmptyHost { .. }));
        assert!(matches!(err("mqtt://h:port"), UrlError::Port { port, .. } if port == "port"));
        assert!(matches!(err("mqtt://h:0"), UrlError::Port { .. }));
        assert!(matches!(err("mqtt://h:70000"), UrlError::Port { .. }));
        assert!(matches!(err("mqtt://[::1"), UrlError::Ipv6 { .. }));
        assert!(matches!(err("mqtt://::1:1883"), UrlError::Ipv6 { .. }));
        assert!(matches!(err("mqtt://[::1]1883"), UrlError::Ipv6 { .. }));
        assert!(matches!(err("mqtt://u:p@h:1"), UrlError::Extra { .. }));
        assert!(matches!(err("mqtt://h:1/topic"), UrlError::Extra { .. }));
        assert!(err("mqtt://h:port").to_string().contains("\"port\""));
    }

    #[test]
    fn display_round_trips() {
        for u in [
            "mqtt://h:1",
            "mqtts://[::1]:8883",
            "mqtts://broker.example:8883",
        ] {
            assert_eq!(BrokerUrl::parse(u).unwrap().to_string(), u);
        }
    }
}
