//! Where things are, as addresses: the listen addresses (`IP:PORT`, `:PORT`, `localhost:PORT`)
//! and the networks of `--trusted-proxies` and `--inject-credentials-for`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{invalid, ConfigError};

/// A network (`--trusted-proxies`, `--inject-credentials-for`): `ADDR/PREFIX` or a single
/// address, parsed and matched by `ipnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or `192.0.2.7` for the config key `key`.
    pub fn parse(key: &'static str, s: &str) -> Result<Cidr, ConfigError> {
        let s = s.trim();
        let net = match s.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) if !s.contains('/') => s
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| invalid(key, format!("{s:?}: not an IP address")))?,
            Err(_) => {
                return Err(invalid(
                    key,
                    format!("{s:?}: want ADDR/PREFIX (prefix 0-32 for IPv4, 0-128 for IPv6)"),
                ))
            }
        };
        Ok(Cidr(net.trunc()))
    }

    /// True when `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical_ip(ip))
    }

    /// True when the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0.network()) || other.0.contains(&self.0.network())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports
/// for IPv4 peers) as the IPv4 address it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A listen address as people write it: `IP:PORT` (`[::]:5000`), `:PORT` or a bare `PORT` (every
/// IPv4 interface, as `0.0.0.0:PORT`), `localhost:PORT` (`127.0.0.1:PORT`). Other host names are
/// refused: which of a name's addresses to bind is the operator's choice, not regrelay's guess.
pub(super) fn listen_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, port),
        None => ("", text),
    };
    let want = "want IP:PORT (0.0.0.0:5000 every interface, 127.0.0.1:5000 this host only, \
                [::]:5000 IPv6), :PORT or localhost:PORT";
    let port: u16 = port.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?}: {port:?} is not a port number; {want}"),
        )
    })?;
    let ip: IpAddr = match host {
        "" | "*" => Ipv4Addr::UNSPECIFIED.into(),
        h if h.eq_ignore_ascii_case("localhost") => Ipv4Addr::LOCALHOST.into(),
        h => {
            return Err(invalid(
                key,
                format!("{text:?}: {h:?} is a host name, and a listener binds an address; {want}"),
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}
