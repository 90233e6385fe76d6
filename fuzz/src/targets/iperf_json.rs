//! Target `iperf-json`: the iperf app's JSON parser on arbitrary bytes, and the writer's output
//! read back.

use iperf::json::{self, MAX_DEPTH, ObjectWriter, Value};

use crate::engine::{Input, Outcome, Steps, Target, check};

const GOOD: &[u8] = br#"{"tcp":true,"omit":0,"time":10,"num":0,"blockcount":0,"parallel":1,"len":131072,"pacing_timer":1000,"client_version":"3.12"}"#;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.iter().map(|(_, v)| depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let bytes = input.rest();
    steps.count(bytes.len() as u64)?;
    if let Ok(value) = json::parse(bytes) {
        check(depth(&value) <= MAX_DEPTH, || {
            format!("accepted nesting {} > {MAX_DEPTH}", depth(&value))
        })?;
        // What we parsed, written as a string member and parsed again, survives.
        if let Some(text) = value.as_str() {
            let mut out = String::new();
            let mut writer = ObjectWriter::new(&mut out);
            writer.string("s", text);
            writer.finish();
            let back = json::parse(out.as_bytes())
                .map_err(|error| format!("writer output {out:?} rejected: {error}"))?;
            check(back.get("s").and_then(Value::as_str) == Some(text), || {
                format!("string {text:?} did not survive writer and parser")
            })?;
        }
        if let Some(number) = value.as_number() {
            check(!number.is_nan(), || "parsed a NaN".to_string())?;
        }
    }
    check(
        json::parse(GOOD)
            .is_ok_and(|value| value.get("len").and_then(Value::as_number) == Some(131072.0)),
        || "well-formed parameters rejected".to_string(),
    )
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        GOOD.to_vec(),
        br#"{"cpu_util_total":1.5,"streams":[{"id":1,"bytes":12345,"retransmits":-1,"jitter":0,"errors":0,"packets":0,"start_time":0,"end_time":10.0004}],"sender_has_retransmits":1}"#.to_vec(),
        br#"["\u00e9\ud83d\ude00\n\"\\",1e308,-0.0,2.5E-3,null,false,[[[]]],{}]"#.to_vec(),
        b"\"\\ud800\"".to_vec(),
        b"123456789012345678901234567890e999".to_vec(),
        vec![b'['; 40],
    ]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "iperf-json",
    about: "iperf3 JSON parser: depth, strings, numbers; writer output parses back",
    default_cases: 200_000,
    max_input_len: 2048,
    memory_bound: 512 * 1024,
    step_bound: 4096,
    seeds,
    run,
};
