//! The app's kernel command-line options (`iperf.port=`, `iperf.raw=`).

/// The iperf3 default port.
pub const DEFAULT_PORT: u16 = 5201;

/// What the app does instead of serving iperf3 clients.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RawMode {
    /// `iperf.raw=tx`: send raw frames as fast as the active path takes them.
    Transmit,
    /// `iperf.raw=rx`: count the frames the NICs deliver.
    Receive,
}

/// The app's options.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Options {
    /// TCP and UDP port to serve on.
    pub port: u16,
    /// A raw-frame mode instead of the server.
    pub raw: Option<RawMode>,
}

/// Why the options are unusable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OptionsError {
    /// `iperf.port` is not a port number 1-65535.
    BadPort,
}

impl Options {
    /// Reads the options through `value` (`key` → its command-line value, `Some("")` for a bare
    /// key). Unknown `iperf.raw` values serve iperf3 as usual.
    pub fn from_cmdline<'a>(
        value: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Options, OptionsError> {
        let port = match value("iperf.port").map(str::parse::<u16>) {
            None => DEFAULT_PORT,
            Some(Ok(port)) if port != 0 => port,
            Some(_) => return Err(OptionsError::BadPort),
        };
        let raw = match value("iperf.raw") {
            Some("tx") => Some(RawMode::Transmit),
            Some("rx") => Some(RawMode::Receive),
            _ => None,
        };
        Ok(Options { port, raw })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&'static str, &'static str)]) -> Result<Options, OptionsError> {
        Options::from_cmdline(|key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
    }

    #[test]
    fn port_and_raw_mode() {
        assert_eq!(
            parse(&[]),
            Ok(Options {
                port: DEFAULT_PORT,
                raw: None
            })
        );
        assert_eq!(parse(&[("iperf.port", "7000")]).unwrap().port, 7000);
        assert_eq!(parse(&[("iperf.port", "0")]), Err(OptionsError::BadPort));
        assert_eq!(
            parse(&[("iperf.port", "65536")]),
            Err(OptionsError::BadPort)
        );
        assert_eq!(parse(&[("iperf.port", "")]), Err(OptionsError::BadPort));
        assert_eq!(
            parse(&[("iperf.raw", "rx")]).unwrap().raw,
            Some(RawMode::Receive)
        );
        assert_eq!(parse(&[("iperf.raw", "x")]).unwrap().raw, None);
    }
}
