//! Network configuration from the kernel command line (Linux-like `ip=`, `gw=`, `dns=`, `mtu=`).
//!
//! Accepted arguments (others are ignored, they belong to someone else):
//! * `ip=10.0.2.15/24` — static IPv4 address with prefix length;
//! * `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>` —
//!   Linux's long form (nfsroot.rst), trailing fields optional; `<server>` and `<device>` are
//!   ignored (there is one interface);
//! * `ip=dhcp` (also `on`, `any`) — DHCP, the default when no `ip=` is given; `ip=off`
//!   (also `none`) — no IPv4 at all;
//! * `gw=10.0.2.2` — default IPv4 gateway (static `ip=` only; DHCP supplies its own);
//! * `dns=10.0.2.3[,2001:db8::53...]` — up to three resolvers, for applications;
//! * `mtu=1500` — IP MTU, 1280 to 9000 (IPv6 needs 1280), lowered to what the NIC supports;
//! * `ip6=2001:db8::15/64`, `gw6=fe80::1` — optional static IPv6 (a link-local address derived
//!   from the MAC is always configured).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::str::FromStr;

use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Cidr, Ipv6Address, Ipv6Cidr};

use crate::Error;

/// Smallest accepted `mtu=`: IPv6 (always on, link-local) cannot work below 1280.
pub const MIN_MTU: usize = 1280;
/// Largest accepted `mtu=` (jumbo frames).
pub const MAX_MTU: usize = 9000;
/// How many `dns=` servers are kept.
pub const MAX_DNS_SERVERS: usize = 3;

/// How the interface gets its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Mode {
    /// Ask a DHCP server (the default).
    Dhcp,
    /// A fixed address, with an optional default gateway.
    Static {
        /// Address and prefix length.
        address: Ipv4Cidr,
        /// Default gateway, inside `address`'s subnet.
        gateway: Option<Ipv4Address>,
    },
    /// No IPv4 (IPv6 link-local only).
    Off,
}

/// A statically configured IPv6 address (besides the automatic link-local one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Static {
    /// Address and prefix length.
    pub address: Ipv6Cidr,
    /// Default gateway (often a link-local router address).
    pub gateway: Option<Ipv6Address>,
}

/// The interface configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// IPv4 addressing.
    pub ipv4: Ipv4Mode,
    /// Optional static IPv6 address.
    pub ipv6: Option<Ipv6Static>,
    /// DNS resolvers, for applications (the stack itself does not resolve names).
    pub dns: Vec<IpAddress>,
    /// IP MTU requested on the command line; `None` = what the NIC offers.
    pub mtu: Option<usize>,
    /// Host name from the long `ip=` form, informational.
    pub hostname: Option<String>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            ipv4: Ipv4Mode::Dhcp,
            ipv6: None,
            dns: Vec::new(),
            mtu: None,
            hostname: None,
        }
    }
}

fn config_error(argument: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        argument: argument.to_string(),
        reason: reason.into(),
    }
}

/// Values collected before cross-argument checks.
#[derive(Default)]
struct Raw<'a> {
    ip: Option<&'a str>,
    gw: Option<&'a str>,
    dns: Option<&'a str>,
    mtu: Option<&'a str>,
    ip6: Option<&'a str>,
    gw6: Option<&'a str>,
}

impl NetConfig {
    /// Parses the network arguments of a kernel command line. Unknown arguments are ignored;
    /// a known argument with a bad value, or given twice, is an error naming it.
    pub fn from_cmdline(cmdline: &str) -> Result<NetConfig, Error> {
        let mut raw = Raw::default();
        for token in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = token.split_once('=') else {
                continue;
            };
            let slot = match key {
                "ip" => &mut raw.ip,
                "gw" => &mut raw.gw,
                "dns" => &mut raw.dns,
                "mtu" => &mut raw.mtu,
                "ip6" => &mut raw.ip6,
                "gw6" => &mut raw.gw6,
                _ => continue,
            };
            if slot.is_some() {
                return Err(config_error(
                    token,
                    format!("`{key}=` is given more than once"),
                ));
            }
            if value.is_empty() {
                return Err(config_error(token, "empty value"));
            }
            *slot = Some(value);
        }

        let mut config = NetConfig::default();
        if let Some(value) = raw.ip {
            parse_ip(value, &mut config)?;
        }
        if let Some(value) = raw.gw {
            let argument = format!("gw={value}");
            let gateway = parse_ipv4(value).ok_or_else(|| {
                config_error(&argument, "not an IPv4 address (expected e.g. gw=10.0.2.2)")
            })?;
            match &mut config.ipv4 {
                Ipv4Mode::Static {
                    address,
                    gateway: slot,
                } => {
                    check_gateway_v4(&argument, *address, gateway)?;
                    if slot.is_some() {
                        return Err(config_error(
                            &argument,
                            "the gateway is already given in the long ip= form",
                        ));
                    }
                    *slot = Some(gateway);
                }
                _ => {
                    return Err(config_error(
                        &argument,
                        "needs a static ip=<address>/<prefix> (DHCP supplies its own gateway)",
                    ));
                }
            }
        }
        if let Some(value) = raw.dns {
            let argument = format!("dns={value}");
            for item in value.split(',') {
                let server = parse_ip_any(item).ok_or_else(|| {
                    config_error(
                        &argument,
                        format!("`{item}` is not an IPv4 or IPv6 address"),
                    )
                })?;
                if !server.is_unicast() {
                    return Err(config_error(&argument, format!("`{item}` is not unicast")));
                }
                if !config.dns.contains(&server) {
                    config.dns.push(server);
                }
            }
            if config.dns.len() > MAX_DNS_SERVERS {
                return Err(config_error(
                    &argument,
                    format!("at most {MAX_DNS_SERVERS} servers are supported"),
                ));
            }
        }
        if let Some(value) = raw.mtu {
            let argument = format!("mtu={value}");
            let mtu: usize = value
                .parse()
                .map_err(|_| config_error(&argument, "not a decimal number"))?;
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(config_error(
                    &argument,
                    format!("out of range {MIN_MTU}..={MAX_MTU} (IPv6 needs at least {MIN_MTU})"),
                ));
            }
            config.mtu = Some(mtu);
        }
        if let Some(value) = raw.ip6 {
            let argument = format!("ip6={value}");
            let (address, prefix) = value.split_once('/').ok_or_else(|| {
                config_error(
                    &argument,
                    "missing prefix length (write e.g. ip6=2001:db8::15/64)",
                )
            })?;
            let address = Ipv6Address::from_str(address)
                .map_err(|_| config_error(&argument, "not an IPv6 address"))?;
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| (1..=128).contains(p))
                .ok_or_else(|| config_error(&argument, "prefix length must be 1..=128"))?;
            if address.is_unspecified()
                || address.is_multicast()
                || address.is_loopback()
                || address.is_unicast_link_local()
            {
                return Err(config_error(
                    &argument,
                    "must be a global or unique-local unicast address (link-local is automatic)",
                ));
            }
            config.ipv6 = Some(Ipv6Static {
                address: Ipv6Cidr::new(address, prefix),
                gateway: None,
            });
        }
        if let Some(value) = raw.gw6 {
            let argument = format!("gw6={value}");
            let gateway = Ipv6Address::from_str(value)
                .map_err(|_| config_error(&argument, "not an IPv6 address"))?;
            if gateway.is_unspecified() || gateway.is_multicast() || gateway.is_loopback() {
                return Err(config_error(&argument, "not a unicast address"));
            }
            match &mut config.ipv6 {
                Some(ipv6) => ipv6.gateway = Some(gateway),
                None => return Err(config_error(&argument, "needs ip6=<address>/<prefix>")),
            }
        }
        Ok(config)
    }
}

fn parse_ipv4(text: &str) -> Option<Ipv4Address> {
    Ipv4Address::from_str(text).ok()
}

fn parse_ip_any(text: &str) -> Option<IpAddress> {
    if let Ok(v4) = Ipv4Address::from_str(text) {
        return Some(IpAddress::Ipv4(v4));
    }
    Ipv6Address::from_str(text).ok().map(IpAddress::Ipv6)
}

/// True for `dhcp`-like autoconfiguration words of Linux's `ip=` argument.
fn is_dhcp_word(word: &str) -> bool {
    matches!(word, "dhcp" | "on" | "any" | "both" | "bootp")
}

fn is_off_word(word: &str) -> bool {
    matches!(word, "off" | "none")
}

fn parse_ip(value: &str, config: &mut NetConfig) -> Result<(), Error> {
    let argument = format!("ip={value}");
    if is_dhcp_word(value) {
        config.ipv4 = Ipv4Mode::Dhcp;
        return Ok(());
    }
    if is_off_word(value) {
        config.ipv4 = Ipv4Mode::Off;
        return Ok(());
    }
    if value.contains(':') {
        return parse_ip_long(&argument, value, config);
    }
    let (address, prefix) = value.split_once('/').ok_or_else(|| {
        config_error(
            &argument,
            "missing prefix length (write e.g. ip=10.0.2.15/24)",
        )
    })?;
    let address = parse_ipv4(address)
        .ok_or_else(|| config_error(&argument, format!("`{address}` is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| config_error(&argument, "prefix length must be 1..=32"))?;
    let cidr = Ipv4Cidr::new(address, prefix);
    check_host_v4(&argument, cidr)?;
    config.ipv4 = Ipv4Mode::Static {
        address: cidr,
        gateway: None,
    };
    Ok(())
}

/// Linux `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>:<ntp>`.
fn parse_ip_long(argument: &str, value: &str, config: &mut NetConfig) -> Result<(), Error> {
    let fields: Vec<&str> = value.split(':').collect();
    if fields.len() > 10 {
        return Err(config_error(
            argument,
            "too many `:` fields (the long form is client:server:gw:netmask:hostname:device:autoconf:dns0:dns1)",
        ));
    }
    let field = |index: usize| fields.get(index).copied().unwrap_or("");
    let optional_v4 = |index: usize, name: &str| -> Result<Option<Ipv4Address>, Error> {
        let text = field(index);
        if text.is_empty() {
            return Ok(None);
        }
        parse_ipv4(text).map(Some).ok_or_else(|| {
            config_error(
                argument,
                format!("{name} field `{text}` is not an IPv4 address"),
            )
        })
    };
    let client = optional_v4(0, "client")?;
    let gateway = optional_v4(2, "gateway")?;
    let netmask = optional_v4(3, "netmask")?;
    let hostname = field(4);
    let autoconf = field(6);
    if !hostname.is_empty() {
        config.hostname = Some(hostname.to_string());
    }
    for (index, name) in [(7, "dns0"), (8, "dns1")] {
        if let Some(server) = optional_v4(index, name)? {
            let server = IpAddress::Ipv4(server);
            if !config.dns.contains(&server) {
                config.dns.push(server);
            }
        }
    }

    let wants_dhcp = is_dhcp_word(autoconf);
    if !(autoconf.is_empty() || wants_dhcp || is_off_word(autoconf)) {
        return Err(config_error(
            argument,
            format!("autoconf field `{autoconf}` must be empty, off, none, dhcp, on or any"),
        ));
    }
    match (client, wants_dhcp) {
        (Some(_), true) => Err(config_error(
            argument,
            "a client address and autoconf=dhcp conflict (leave the client field empty for DHCP)",
        )),
        (None, true) => {
            config.ipv4 = Ipv4Mode::Dhcp;
            Ok(())
        }
        (None, false) => Err(config_error(
            argument,
            "no client address and no autoconf method (give the client field or autoconf=dhcp)",
        )),
        (Some(client), false) => {
            let netmask = netmask.ok_or_else(|| {
                config_error(
                    argument,
                    "netmask field is empty (e.g. ip=10.0.2.15::10.0.2.2:255.255.255.0)",
                )
            })?;
            let cidr = Ipv4Cidr::from_netmask(client, netmask).map_err(|_| {
                config_error(argument, format!("netmask {netmask} is not contiguous"))
            })?;
            if cidr.prefix_len() == 0 {
                return Err(config_error(argument, "netmask 0.0.0.0 is not usable"));
            }
            check_host_v4(argument, cidr)?;
            if let Some(gateway) = gateway {
                check_gateway_v4(argument, cidr, gateway)?;
            }
            config.ipv4 = Ipv4Mode::Static {
                address: cidr,
                gateway,
            };
            Ok(())
        }
    }
}

/// The address must be a host address smoltcp accepts (it panics on non-unicast addresses).
fn check_host_v4(argument: &str, cidr: Ipv4Cidr) -> Result<(), Error> {
    let address = cidr.address();
    if address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_loopback()
    {
        return Err(config_error(
            argument,
            format!("{address} is not a unicast host address"),
        ));
    }
    if cidr.prefix_len() <= 30 {
        if address == cidr.network().address() {
            return Err(config_error(
                argument,
                format!(
                    "{address} is the network address of its /{} subnet",
                    cidr.prefix_len()
                ),
            ));
        }
        if Some(address) == cidr.broadcast() {
            return Err(config_error(
                argument,
                format!(
                    "{address} is the broadcast address of its /{} subnet",
                    cidr.prefix_len()
                ),
            ));
        }
    }
    Ok(())
}

fn check_gateway_v4(argument: &str, cidr: Ipv4Cidr, gateway: Ipv4Address) -> Result<(), Error> {
    if gateway == cidr.address() {
        return Err(config_error(
            argument,
            "the gateway equals the interface address",
        ));
    }
    if !cidr.contains_addr(&gateway) || Some(gateway) == cidr.broadcast() {
        return Err(config_error(
            argument,
            format!(
                "gateway {gateway} is not a host inside {}/{}",
                cidr.address(),
                cidr.prefix_len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Address {
        Ipv4Address::new(a, b, c, d)
    }

    fn reason(cmdline: &str) -> String {
        match NetConfig::from_cmdline(cmdline) {
            Err(Error::Config { argument, reason }) => format!("{argument}: {reason}"),
            other => panic!("expected a config error for {cmdline:?}, got {other:?}"),
        }
    }

    #[test]
    fn empty_cmdline_means_dhcp() {
        let config = NetConfig::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(config, NetConfig::default());
        assert_eq!(config.ipv4, Ipv4Mode::Dhcp);
    }

    #[test]
    fn static_short_form_with_gateway_dns_and_mtu() {
        let config = NetConfig::from_cmdline(
            "console=ttyS0 ip=10.0.2.15/24 gw=10.0.2.2 dns=10.0.2.3,2001:db8::53 mtu=1400",
        )
        .unwrap();
        assert_eq!(
            config.ipv4,
            Ipv4Mode::Static {
                address: Ipv4Cidr::new(v4(10, 0, 2, 15), 24),
                gateway: Some(v4(10, 0, 2, 2))
            }
        );
        assert_eq!(
            config.dns,
            [
                IpAddress::Ipv4(v4(10, 0, 2, 3)),
                IpAddress::Ipv6(Ipv6Address::from_str("2001:db8::53").unwrap())
            ]
        );
        assert_eq!(config.mtu, Some(1400));
    }

    #[test]
    fn linux_long_form() {
        let config =
            NetConfig::from_cmdline("ip=10.0.2.15::10.0.2.2:255.255.255.0:guest:eth0:off:10.0.2.3")
                .unwrap();
        assert_eq!(
            config.ipv4,
            Ipv4Mode::Static {
                address: Ipv4Cidr::new(v4(10, 0, 2, 15), 24),
                gateway: Some(v4(10, 0, 2, 2))
            }
        );
        assert_eq!(config.hostname.as_deref(), Some("guest"));
        assert_eq!(config.dns, [IpAddress::Ipv4(v4(10, 0, 2, 3))]);

        let short = NetConfig::from_cmdline("ip=192.168.1.7::192.168.1.1:255.255.0.0").unwrap();
        assert_eq!(
            short.ipv4,
            Ipv4Mode::Static {
                address: Ipv4Cidr::new(v4(192, 168, 1, 7), 16),
                gateway: Some(v4(192, 168, 1, 1))
            }
        );
        let dhcp = NetConfig::from_cmdline("ip=:::::eth0:dhcp").unwrap();
        assert_eq!(dhcp.ipv4, Ipv4Mode::Dhcp);
    }

    #[test]
    fn dhcp_and_off_words() {
        assert_eq!(
            NetConfig::from_cmdline("ip=dhcp").unwrap().ipv4,
            Ipv4Mode::Dhcp
        );
        assert_eq!(
            NetConfig::from_cmdline("ip=off").unwrap().ipv4,
            Ipv4Mode::Off
        );
        assert_eq!(
            NetConfig::from_cmdline("ip=none").unwrap().ipv4,
            Ipv4Mode::Off
        );
    }

    #[test]
    fn static_ipv6() {
        let config = NetConfig::from_cmdline("ip6=2001:db8::15/64 gw6=fe80::1").unwrap();
        assert_eq!(
            config.ipv6,
            Some(Ipv6Static {
                address: Ipv6Cidr::new(Ipv6Address::from_str("2001:db8::15").unwrap(), 64),
                gateway: Some(Ipv6Address::from_str("fe80::1").unwrap()),
            })
        );
    }

    #[test]
    fn invalid_addresses_are_rejected_with_the_argument_named() {
        assert_eq!(
            reason("ip=10.0.2.300/24"),
            "ip=10.0.2.300/24: `10.0.2.300` is not an IPv4 address"
        );
        assert!(reason("ip=10.0.2.15").contains("missing prefix length"));
        assert!(reason("ip=10.0.2.15/33").contains("prefix length must be 1..=32"));
        assert!(reason("ip=10.0.2.15/0").contains("prefix length must be 1..=32"));
        assert!(reason("ip=224.0.0.1/24").contains("not a unicast host address"));
        assert!(reason("ip=0.0.0.0/8").contains("not a unicast host address"));
        assert!(reason("ip=10.0.2.0/24").contains("network address"));
        assert!(reason("ip=10.0.2.255/24").contains("broadcast address"));
        assert!(reason("ip6=fe80::5/64").contains("link-local is automatic"));
        assert!(reason("ip6=2001:db8::5").contains("missing prefix length"));
        assert!(reason("dns=10.0.2.3,banana").contains("`banana` is not an IPv4 or IPv6"));
        assert!(reason("dns=1.1.1.1,8.8.8.8,9.9.9.9,1.0.0.1").contains("at most 3"));
    }

    #[test]
    fn invalid_combinations_are_rejected() {
        assert!(reason("gw=10.0.2.2").contains("needs a static ip="));
        assert!(reason("ip=dhcp gw=10.0.2.2").contains("needs a static ip="));
        assert!(reason("ip=10.0.2.15/24 gw=10.0.3.1").contains("not a host inside 10.0.2.15/24"));
        assert!(reason("ip=10.0.2.15/24 gw=10.0.2.15").contains("equals the interface"));
        assert!(reason("ip=10.0.2.15/24 ip=10.0.2.16/24").contains("more than once"));
        assert!(reason("gw6=fe80::1").contains("needs ip6="));
        assert!(reason("ip=").contains("empty value"));
    }

    #[test]
    fn invalid_long_forms_are_rejected() {
        assert!(reason("ip=10.0.2.15::10.0.2.2").contains("netmask field is empty"));
        assert!(reason("ip=10.0.2.15::10.0.2.2:255.0.255.0").contains("not contiguous"));
        assert!(reason("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:dhcp").contains("conflict"));
        assert!(reason("ip=::10.0.2.2:255.255.255.0").contains("no client address"));
        assert!(reason("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:rarpx").contains("autoconf"));
        assert!(reason("ip=10.0.2.15::10.0.9.2:255.255.255.0").contains("not a host inside"));
    }

    #[test]
    fn mtu_bounds() {
        assert_eq!(NetConfig::from_cmdline("mtu=1280").unwrap().mtu, Some(1280));
        assert_eq!(NetConfig::from_cmdline("mtu=9000").unwrap().mtu, Some(9000));
        assert!(reason("mtu=1279").contains("out of range 1280..=9000"));
        assert!(reason("mtu=9001").contains("out of range"));
        assert!(reason("mtu=big").contains("not a decimal number"));
    }

    #[test]
    fn error_display_names_the_argument() {
        let error = NetConfig::from_cmdline("mtu=12").unwrap_err();
        assert_eq!(
            alloc::string::ToString::to_string(&error),
            "kernel command line `mtu=12`: out of range 1280..=9000 (IPv6 needs at least 1280)"
        );
    }
}
