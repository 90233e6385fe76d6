//! A short digest of failed tests' panic messages, printed last so that a log viewer that
//! shows only the tail (CI's) still shows why each test failed.
//!
//! libtest prints a failed test's captured output under `---- name stdout ----`: the test's
//! own prints (for a QEMU test, every serial line), then `thread '…' panicked at file:line:col:`
//! and the message, then possibly a backtrace. The message is what explains the failure, but
//! it sits above the backtrace and the run's summary, and a nested test's message carries the
//! guest's last console lines after the part that matters. The digest keeps each message's
//! head and tail.

/// Lines of a message's beginning kept (what the assertion says, and e.g. a tool's report).
pub const HEAD_LINES: usize = 14;
/// Lines of a message's end kept (e.g. a guest's last console lines).
pub const TAIL_LINES: usize = 6;
/// Characters kept of one line.
pub const LINE_CHARS: usize = 240;

/// One failed test's panic, as the digest shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The test's name from the `---- name stdout ----` header.
    pub test: String,
    /// `file:line:col` of the panic.
    pub location: String,
    /// The panic message's lines.
    pub message: Vec<String>,
}

/// The failures of a `cargo test` run's output, in the order libtest printed them.
pub fn failures(output: &str) -> Vec<Failure> {
    let mut found = Vec::new();
    let mut lines = output.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(test) = section_name(line) else {
            continue;
        };
        // The section's captured prints, up to the panic (or the section's end: a test that
        // failed without panicking, e.g. one returning Err, has only its prints).
        let mut location = None;
        while let Some(next) = lines.peek() {
            if section_name(next).is_some() || is_section_end(next) {
                break;
            }
            let next = lines.next().unwrap_or_default();
            if let Some(at) = panic_location(next) {
                location = Some(at.to_string());
                break;
            }
        }
        let Some(location) = location else {
            found.push(Failure {
                test: test.to_string(),
                location: String::new(),
                message: Vec::new(),
            });
            continue;
        };
        let mut message = Vec::new();
        while let Some(next) = lines.peek() {
            if section_name(next).is_some() || is_section_end(next) || is_message_end(next) {
                break;
            }
            message.push(lines.next().unwrap_or_default().to_string());
        }
        while message.last().is_some_and(|line| line.trim().is_empty()) {
            message.pop();
        }
        found.push(Failure {
            test: test.to_string(),
            location,
            message,
        });
    }
    found
}

/// The digest's lines for `failures` (empty when there are none).
pub fn render(failures: &[Failure]) -> Vec<String> {
    let mut lines = Vec::new();
    if failures.is_empty() {
        return lines;
    }
    lines.push(format!(
        "xtask: === why {} test{} failed (head and tail of each panic message; all of it is above) ===",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" }
    ));
    for failure in failures {
        if failure.location.is_empty() {
            lines.push(format!(
                "xtask: {}: failed without a panic message",
                failure.test
            ));
            continue;
        }
        lines.push(format!(
            "xtask: {} panicked at {}:",
            failure.test, failure.location
        ));
        let message = &failure.message;
        let keep = |line: &String| format!("  {}", clip(line));
        if message.len() <= HEAD_LINES + TAIL_LINES + 1 {
            lines.extend(message.iter().map(keep));
        } else {
            lines.extend(message[..HEAD_LINES].iter().map(keep));
            lines.push(format!(
                "  [… {} lines …]",
                message.len() - HEAD_LINES - TAIL_LINES
            ));
            lines.extend(message[message.len() - TAIL_LINES..].iter().map(keep));
        }
    }
    lines
}

/// `name` of a `---- name stdout ----` header.
fn section_name(line: &str) -> Option<&str> {
    line.strip_prefix("---- ")?.strip_suffix(" stdout ----")
}

/// The list of failed tests that follows the captured outputs.
fn is_section_end(line: &str) -> bool {
    line == "failures:" || line.starts_with("test result: ")
}

/// What libtest or the panic hook prints after a message.
fn is_message_end(line: &str) -> bool {
    line == "stack backtrace:" || line.starts_with("note: run with `RUST_BACKTRACE")
}

/// `file:line:col` of `thread 'name' (id) panicked at file:line:col:`.
fn panic_location(line: &str) -> Option<&str> {
    if !line.starts_with("thread '") {
        return None;
    }
    let (_, rest) = line.split_once(" panicked at ")?;
    Some(rest.strip_suffix(':').unwrap_or(rest))
}

/// `line` cut to [`LINE_CHARS`] characters (on a character boundary), terminal colour
/// sequences (in OpenVMM's log lines) and other control characters dropped.
fn clip(line: &str) -> String {
    let mut visible = String::with_capacity(line.len());
    let mut characters = line.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            if characters.next() == Some('[') {
                for inner in characters.by_ref() {
                    if inner.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if !character.is_control() {
            visible.push(character);
        }
    }
    if visible.chars().count() > LINE_CHARS {
        let mut clipped: String = visible.chars().take(LINE_CHARS).collect();
        clipped.push('…');
        clipped
    } else {
        visible
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_output(message: &[String]) -> String {
        let mut output = String::from(
            "running 2 tests\ntest a ... ok\ntest iperf_case ... FAILED\n\nfailures:\n\n\
             ---- iperf_case stdout ----\n[guest] booted\n[guest] serial line\n\
             thread 'iperf_case' (1234) panicked at tests/openvmm.rs:294:5:\n",
        );
        for line in message {
            output.push_str(line);
            output.push('\n');
        }
        output.push_str(
            "stack backtrace:\n   0: frame\n\n\nfailures:\n    iperf_case\n\n\
             test result: FAILED. 1 passed; 1 failed\n",
        );
        output
    }

    #[test]
    fn a_long_message_keeps_its_head_and_tail_and_says_how_much_was_left_out() {
        let message: Vec<String> = (0..40).map(|index| format!("line {index}")).collect();
        let found = failures(&run_output(&message));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].test, "iperf_case");
        assert_eq!(found[0].location, "tests/openvmm.rs:294:5");
        assert_eq!(
            found[0].message, message,
            "the prints before the panic are not message"
        );
        let digest = render(&found);
        assert_eq!(digest.len(), 2 + HEAD_LINES + 1 + TAIL_LINES);
        assert!(digest[0].contains("why 1 test failed"));
        assert_eq!(
            digest[1],
            "xtask: iperf_case panicked at tests/openvmm.rs:294:5:"
        );
        assert_eq!(digest[2], "  line 0");
        assert_eq!(digest[1 + HEAD_LINES], "  line 13");
        assert_eq!(digest[2 + HEAD_LINES], "  [… 20 lines …]");
        assert_eq!(digest.last().map(String::as_str), Some("  line 39"));
    }

    #[test]
    fn a_short_message_is_kept_whole_and_without_its_trailing_blank_lines() {
        let message = vec![
            "assertion failed: 3 of 3 answered".to_string(),
            String::new(),
        ];
        let found = failures(&run_output(&message));
        assert_eq!(found[0].message, vec!["assertion failed: 3 of 3 answered"]);
        assert_eq!(render(&found).len(), 3);
    }

    #[test]
    fn messages_end_at_the_next_section_and_without_a_backtrace() {
        let output = "failures:\n\n---- first stdout ----\n\
             thread 'first' panicked at a.rs:1:2:\nfirst message\n\n\
             ---- second stdout ----\nprint\n\
             thread 'second' panicked at b.rs:3:4:\nsecond message\n\
             note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n\n\
             ---- third stdout ----\nonly prints\n\nfailures:\n    first\n";
        let found = failures(output);
        let summary: Vec<(&str, &str, Vec<String>)> = found
            .iter()
            .map(|failure| {
                (
                    failure.test.as_str(),
                    failure.location.as_str(),
                    failure.message.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("first", "a.rs:1:2", vec!["first message".to_string()]),
                ("second", "b.rs:3:4", vec!["second message".to_string()]),
                ("third", "", Vec::new()),
            ]
        );
        let digest = render(&found);
        assert!(digest[0].contains("why 3 tests failed"));
        assert_eq!(
            digest.last().map(String::as_str),
            Some("xtask: third: failed without a panic message")
        );
    }

    #[test]
    fn long_lines_are_clipped_and_terminal_colours_dropped() {
        let long = format!("\u{1b}[2m{}\u{1b}[0m", "x".repeat(LINE_CHARS + 10));
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), LINE_CHARS + 1);
        assert!(clipped.ends_with('…'));
        assert!(clipped.starts_with("xxx"), "{clipped}");
        assert_eq!(clip("ünïcode"), "ünïcode");
    }

    #[test]
    fn a_passing_run_has_no_digest() {
        let output = "running 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed\n";
        assert!(failures(output).is_empty());
        assert!(render(&[]).is_empty());
    }
}
