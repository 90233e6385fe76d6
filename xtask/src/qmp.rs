//! A QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is one JSON object per line. After the greeting the client must send
//! `qmp_capabilities`; afterwards every command gets a `return` or `error` reply carrying the
//! command's `id`, and asynchronous `event` messages may arrive at any time in between. Events
//! read while waiting for a reply are queued so a later [`Qmp::wait_event`] still sees them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// How long a command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One message from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub enum QmpMessage {
    /// The greeting sent on connect (`{"QMP": {...}}`).
    Greeting(Value),
    /// A successful reply.
    Return {
        /// The `id` we sent, if any.
        id: Option<Value>,
        /// The returned value.
        value: Value,
    },
    /// A failed reply.
    Error {
        /// The `id` we sent, if any.
        id: Option<Value>,
        /// Error class, e.g. `GenericError`.
        class: String,
        /// Human-readable description.
        description: String,
    },
    /// An asynchronous event.
    Event {
        /// Event name, e.g. `DEVICE_DELETED`.
        name: String,
        /// Event data (`null` when absent).
        data: Value,
    },
}

/// Parses one QMP line.
pub fn parse_message(line: &str) -> Result<QmpMessage> {
    let value: Value = serde_json::from_str(line)
        .map_err(|error| Error::QmpProtocol(format!("invalid JSON {line:?}: {error}")))?;
    let Some(object) = value.as_object() else {
        return Err(Error::QmpProtocol(format!("not a JSON object: {line:?}")));
    };
    let id = object.get("id").cloned();
    if let Some(greeting) = object.get("QMP") {
        Ok(QmpMessage::Greeting(greeting.clone()))
    } else if let Some(returned) = object.get("return") {
        Ok(QmpMessage::Return {
            id,
            value: returned.clone(),
        })
    } else if let Some(error) = object.get("error") {
        Ok(QmpMessage::Error {
            id,
            class: error["class"].as_str().unwrap_or("unknown").to_string(),
            description: error["desc"].as_str().unwrap_or("").to_string(),
        })
    } else if let Some(name) = object.get("event").and_then(Value::as_str) {
        Ok(QmpMessage::Event {
            name: name.to_string(),
            data: object.get("data").cloned().unwrap_or(Value::Null),
        })
    } else {
        Err(Error::QmpProtocol(format!("unknown message {line:?}")))
    }
}

/// The command line sent for `execute`.
pub fn command_line(command: &str, arguments: Option<&Value>, id: u64) -> String {
    let mut message = json!({ "execute": command, "id": id });
    if let Some(arguments) = arguments {
        message["arguments"] = arguments.clone();
    }
    let mut line = message.to_string();
    line.push('\n');
    line
}

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not yet complete when a read timed out.
    partial: Vec<u8>,
    events: VecDeque<(String, Value)>,
    next_id: u64,
    greeting: Value,
}

impl Qmp {
    /// Connects to `socket` (retrying until QEMU has created it, up to `timeout`) and performs
    /// the `qmp_capabilities` handshake.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() >= deadline => {
                    return Err(Error::io(
                        format!("connecting to QMP socket {}", socket.display()),
                        error,
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let writer = stream
            .try_clone()
            .map_err(|error| Error::io("cloning the QMP socket", error))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
        };
        match qmp.read_message(deadline)? {
            Some(QmpMessage::Greeting(greeting)) => qmp.greeting = greeting,
            Some(other) => {
                return Err(Error::QmpProtocol(format!(
                    "expected the greeting, got {other:?}"
                )));
            }
            None => {
                return Err(Error::QmpProtocol(
                    "no greeting within the timeout".to_string(),
                ));
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The greeting's `version` object.
    pub fn version(&self) -> &Value {
        &self.greeting["version"]
    }

    /// Reads one message, or `None` when `deadline` passes first.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<QmpMessage>> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(|error| Error::io("setting the QMP read timeout", error))?;
            // read_until keeps what it read so far in `partial` even when it times out.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(Error::QmpProtocol(
                        "QEMU closed the QMP connection".to_string(),
                    ));
                }
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = String::from_utf8_lossy(&self.partial).trim().to_string();
                    self.partial.clear();
                    if !line.is_empty() {
                        return parse_message(&line).map(Some);
                    }
                }
                Ok(_) => {}
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(Error::io("reading from QMP", error)),
            }
        }
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let line = command_line(command, arguments.as_ref(), id);
        self.writer
            .write_all(line.as_bytes())
            .map_err(|error| Error::io(format!("sending QMP command {command}"), error))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let ours = |reply_id: &Option<Value>| reply_id.as_ref().is_none_or(|value| *value == id);
        loop {
            match self.read_message(deadline)? {
                None => {
                    return Err(Error::QmpProtocol(format!(
                        "no reply to {command} within {} s",
                        COMMAND_TIMEOUT.as_secs()
                    )));
                }
                Some(QmpMessage::Event { name, data }) => self.events.push_back((name, data)),
                Some(QmpMessage::Return {
                    id: reply_id,
                    value,
                }) if ours(&reply_id) => {
                    return Ok(value);
                }
                Some(QmpMessage::Error {
                    id: reply_id,
                    class,
                    description,
                }) if ours(&reply_id) => {
                    return Err(Error::Qmp {
                        command: command.to_string(),
                        class,
                        description,
                    });
                }
                Some(other) => {
                    return Err(Error::QmpProtocol(format!(
                        "unexpected reply to {command}: {other:?}"
                    )));
                }
            }
        }
    }

    /// Waits for event `name` whose data satisfies `wanted`; other events stay queued.
    pub fn wait_event_where(
        &mut self,
        name: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let matches = |event: &(String, Value)| event.0 == name && wanted(&event.1);
        if let Some(index) = self.events.iter().position(matches) {
            return Ok(self
                .events
                .remove(index)
                .map(|(_, data)| data)
                .unwrap_or_default());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline)? {
                None => {
                    return Err(Error::Timeout {
                        waiting_for: format!("QMP event {name}"),
                        after: timeout,
                        context: format!("events seen meanwhile: {:?}", self.events),
                    });
                }
                Some(QmpMessage::Event {
                    name: event_name,
                    data,
                }) => {
                    let event = (event_name, data);
                    if matches(&event) {
                        return Ok(event.1);
                    }
                    self.events.push_back(event);
                }
                Some(other) => {
                    return Err(Error::QmpProtocol(format!(
                        "unexpected message while waiting for {name}: {other:?}"
                    )));
                }
            }
        }
    }

    /// Waits for event `name` (any data).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_event_where(name, timeout, |_| true)
    }

    /// Removes and returns the queued events (name, data).
    pub fn take_events(&mut self) -> Vec<(String, Value)> {
        self.events.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_every_message_kind() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert!(
            matches!(parse_message(greeting).unwrap(), QmpMessage::Greeting(g) if g["version"]["qemu"]["major"] == 10)
        );
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 3}"#).unwrap(),
            QmpMessage::Return {
                id: Some(json!(3)),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(
                r#"{"id": 4, "error": {"class": "GenericError", "desc": "Device 'hp0' not found"}}"#
            )
            .unwrap(),
            QmpMessage::Error {
                id: Some(json!(4)),
                class: "GenericError".to_string(),
                description: "Device 'hp0' not found".to_string()
            }
        );
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "hp0", "path": "/machine/peripheral/hp0"}}"#;
        assert_eq!(
            parse_message(event).unwrap(),
            QmpMessage::Event {
                name: "DEVICE_DELETED".to_string(),
                data: json!({"device": "hp0", "path": "/machine/peripheral/hp0"})
            }
        );
        assert!(parse_message("[1]").is_err());
        assert!(parse_message("{\"surprise\": 1}").is_err());
        assert!(parse_message("{").is_err());
    }

    #[test]
    fn command_lines_carry_id_and_arguments() {
        let line = command_line("device_del", Some(&json!({"id": "hp0"})), 7);
        assert!(line.ends_with('\n'));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value,
            json!({"execute": "device_del", "id": 7, "arguments": {"id": "hp0"}})
        );
        let bare: Value = serde_json::from_str(&command_line("query-status", None, 1)).unwrap();
        assert!(bare.get("arguments").is_none());
    }

    /// A fake QEMU: greets, answers commands per `script`, interleaving events.
    fn fake_server(
        script: Vec<&'static str>,
    ) -> (tempdir::Dir, std::thread::JoinHandle<Vec<String>>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.path.join("qmp.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writeln!(
                writer,
                r#"{{"QMP": {{"version": {{"qemu": {{"major": 10}}}}, "capabilities": []}}}}"#
            )
            .unwrap();
            let mut received = Vec::new();
            for reply in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                received.push(line.trim().to_string());
                // Split the reply in two writes to exercise partial-line reads.
                let (head, tail) = reply.split_at(reply.len() / 2);
                writer.write_all(head.as_bytes()).unwrap();
                writer.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
                writer.write_all(tail.as_bytes()).unwrap();
            }
            // Keep the connection open until the client hangs up.
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
            received
        });
        (dir, handle)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("xtask-qmp-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn events_arriving_before_a_reply_are_kept_for_wait_event() {
        let (dir, server) = fake_server(vec![
            "{\"return\": {}, \"id\": 1}\n",
            concat!(
                "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"other\"}}\n",
                "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"hp0\"}}\n",
                "{\"return\": {}, \"id\": 2}\n"
            ),
            "{\"id\": 3, \"error\": {\"class\": \"GenericError\", \"desc\": \"Bus 'rp9' not found\"}}\n",
        ]);
        let mut qmp = Qmp::connect(&dir.path.join("qmp.sock"), Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version()["qemu"]["major"], 10);
        qmp.execute("device_del", Some(json!({"id": "hp0"})))
            .unwrap();
        let data = qmp
            .wait_event_where("DEVICE_DELETED", Duration::from_secs(1), |data| {
                data["device"] == "hp0"
            })
            .unwrap();
        assert_eq!(data["device"], "hp0");
        let error = qmp
            .execute(
                "device_add",
                Some(json!({"driver": "e1000e", "bus": "rp9"})),
            )
            .unwrap_err();
        assert!(error.to_string().contains("Bus 'rp9' not found"), "{error}");
        assert_eq!(
            qmp.take_events(),
            vec![("DEVICE_DELETED".to_string(), json!({"device": "other"}))]
        );
        let timeout = qmp
            .wait_event("SHUTDOWN", Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(timeout, Error::Timeout { .. }), "{timeout}");
        drop(qmp);
        let received = server.join().unwrap();
        assert!(received[0].contains("qmp_capabilities"));
        assert!(received[1].contains("device_del"));
    }
}
