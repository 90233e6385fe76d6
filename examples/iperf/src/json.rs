//! A small JSON (RFC 8259) parser and writer for the iperf3 control messages.
//!
//! The input comes from the network, so the parser is strict and bounded: it rejects anything
//! that is not exactly one JSON value (plus whitespace), nests at most [`MAX_DEPTH`] levels, and
//! never panics or recurses without limit. Callers cap the input length before parsing.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::error::Error;

/// Deepest nesting of arrays/objects accepted (iperf3 messages use 3).
pub const MAX_DEPTH: usize = 32;

/// A parsed JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any number, as a double (what cJSON keeps too).
    Number(f64),
    /// A string (escapes resolved).
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object; keys in input order (duplicates kept, the first one wins on lookup).
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object (`None` for other values or a missing key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    /// The value as a number, if it is one.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(number) => Some(*number),
            _ => None,
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(text) => Some(text),
            _ => None,
        }
    }
}

/// Parses exactly one JSON value from `input`.
pub fn parse(input: &[u8]) -> Result<Value, Error> {
    let mut parser = Parser { input, offset: 0 };
    parser.skip_whitespace();
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.offset != input.len() {
        return Err(parser.error("trailing bytes after the value"));
    }
    Ok(value)
}

struct Parser<'a> {
    input: &'a [u8],
    offset: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &'static str) -> Error {
        Error::Json {
            offset: self.offset,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.offset).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.offset += 1;
        }
    }

    fn expect_literal(&mut self, literal: &[u8], value: Value) -> Result<Value, Error> {
        if self.input[self.offset..].starts_with(literal) {
            self.offset += literal.len();
            Ok(value)
        } else {
            Err(self.error("unknown literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        match self.peek() {
            None => Err(self.error("unexpected end of input")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.expect_literal(b"true", Value::Bool(true)),
            Some(b'f') => self.expect_literal(b"false", Value::Bool(false)),
            Some(b'n') => self.expect_literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.offset += 1; // '{'
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.offset += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':'"));
            }
            self.offset += 1;
            self.skip_whitespace();
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.offset += 1,
                Some(b'}') => {
                    self.offset += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.offset += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.offset += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.offset += 1,
                Some(b']') => {
                    self.offset += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let digits = self
            .input
            .get(self.offset..self.offset + 4)
            .ok_or_else(|| self.error("truncated \\u escape"))?;
        let mut code = 0;
        for &digit in digits {
            let nibble = char::from(digit)
                .to_digit(16)
                .ok_or_else(|| self.error("bad hex digit in \\u escape"))?;
            code = code * 16 + nibble;
        }
        self.offset += 4;
        Ok(code)
    }

    fn string(&mut self) -> Result<String, Error> {
        self.offset += 1; // opening quote
        let mut text = String::new();
        loop {
            // Copy the run of plain bytes up to the next quote, backslash or control byte.
            let start = self.offset;
            while let Some(byte) = self.peek() {
                if byte == b'"' || byte == b'\\' || byte < 0x20 {
                    break;
                }
                self.offset += 1;
            }
            let run =
                core::str::from_utf8(&self.input[start..self.offset]).map_err(|_| Error::Json {
                    offset: start,
                    reason: "string is not UTF-8",
                })?;
            text.push_str(run);
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.offset += 1;
                    return Ok(text);
                }
                Some(b'\\') => {
                    self.offset += 1;
                    let escape = self.peek().ok_or_else(|| self.error("truncated escape"))?;
                    self.offset += 1;
                    let resolved = match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(self.error("unknown escape")),
                    };
                    text.push(resolved);
                }
                Some(_) => return Err(self.error("control character in string")),
            }
        }
    }

    /// The character of a `\uXXXX` escape (the `\u` is consumed), joining surrogate pairs.
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if !self.input[self.offset..].starts_with(b"\\u") {
                    return Err(self.error("lone high surrogate"));
                }
                self.offset += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.error("bad low surrogate"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.error("lone low surrogate")),
            _ => first,
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid code point"))
    }

    fn digits(&mut self) -> usize {
        let start = self.offset;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.offset += 1;
        }
        self.offset - start
    }

    fn number(&mut self) -> Result<Value, Error> {
        let start = self.offset;
        if self.peek() == Some(b'-') {
            self.offset += 1;
        }
        let integer_start = self.offset;
        let integer_digits = self.digits();
        if integer_digits == 0 {
            return Err(self.error("expected digits"));
        }
        if integer_digits > 1 && self.input[integer_start] == b'0' {
            return Err(Error::Json {
                offset: integer_start,
                reason: "leading zero",
            });
        }
        if self.peek() == Some(b'.') {
            self.offset += 1;
            if self.digits() == 0 {
                return Err(self.error("expected digits after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.offset += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.offset += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("expected exponent digits"));
            }
        }
        // The lexeme is ASCII by construction, and valid for Rust's float grammar.
        let lexeme = core::str::from_utf8(&self.input[start..self.offset])
            .map_err(|_| self.error("number is not ASCII"))?;
        let number: f64 = lexeme
            .parse()
            .map_err(|_| self.error("number out of range"))?;
        if !number.is_finite() {
            return Err(self.error("number out of range"));
        }
        Ok(Value::Number(number))
    }
}

/// Builds one JSON object as text, member by member.
pub struct ObjectWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut String) -> ObjectWriter<'a> {
        out.push('{');
        ObjectWriter { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        write_string(self.out, key);
        self.out.push(':');
    }

    /// Adds an integer member.
    pub fn integer(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        // Writing to a String cannot fail.
        let _ = write!(self.out, "{value}");
        self
    }

    /// Adds a number member (non-finite values, which JSON cannot carry, become 0).
    pub fn number(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        write_number(self.out, value);
        self
    }

    /// Adds a string member.
    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_string(self.out, value);
        self
    }

    /// Adds an array member whose elements `fill` writes (separated by the caller with
    /// [`ArrayWriter`]).
    pub fn array(&mut self, key: &str, fill: impl FnOnce(&mut ArrayWriter<'_>)) -> &mut Self {
        self.key(key);
        let mut array = ArrayWriter::new(self.out);
        fill(&mut array);
        array.finish();
        self
    }

    /// Closes the object.
    pub fn finish(self) {
        self.out.push('}');
    }
}

/// Builds one JSON array of objects as text.
pub struct ArrayWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> ArrayWriter<'a> {
    fn new(out: &'a mut String) -> ArrayWriter<'a> {
        out.push('[');
        ArrayWriter { out, first: true }
    }

    /// Appends an object element filled by `fill`.
    pub fn object(&mut self, fill: impl FnOnce(&mut ObjectWriter<'_>)) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        let mut object = ObjectWriter::new(self.out);
        fill(&mut object);
        object.finish();
    }

    fn finish(self) {
        self.out.push(']');
    }
}

fn write_number(out: &mut String, value: f64) {
    if !value.is_finite() {
        out.push('0');
        return;
    }
    // Rust prints floats without an exponent and with the shortest round-trip digits, which is
    // valid JSON ("0.000014293945312499997", "12", "-1.5").
    let _ = write!(out, "{value}");
}

fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(control));
            }
            other => out.push(other),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(text: &str) -> Option<f64> {
        parse(text.as_bytes()).ok()?.as_number()
    }

    #[test]
    fn an_iperf3_parameter_message_parses() {
        let value =
            parse(br#" {"tcp":true,"time":10,"parallel":4,"len":131072,"client_version":"3.12"} "#)
                .unwrap();
        assert_eq!(value.get("parallel").and_then(Value::as_number), Some(4.0));
        assert_eq!(
            value.get("client_version").and_then(Value::as_str),
            Some("3.12")
        );
        assert_eq!(value.get("tcp"), Some(&Value::Bool(true)));
        assert_eq!(value.get("missing"), None);
    }

    #[test]
    fn numbers_and_strings_follow_rfc_8259() {
        assert_eq!(number("-0.5e2"), Some(-50.0));
        assert_eq!(number("0"), Some(0.0));
        for bad in ["01", "1.", ".5", "+1", "1e", "--1", "0x10"] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad} accepted");
        }
        let text = parse(br#""a\"b\\c\/\n\u00e9\ud83d\ude00""#).unwrap();
        assert_eq!(text.as_str(), Some("a\"b\\c/\né😀"));
        for bad in [
            &br#""\ud800""#[..],
            br#""\x""#,
            b"\"\x01\"",
            b"\"open",
            b"\"\xff\"",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exactly_one_value_and_bounded_nesting() {
        assert!(parse(b"").is_err());
        assert!(parse(b"{} {}").is_err());
        assert!(parse(b"[1,]").is_err());
        assert!(parse(br#"{"a":1,}"#).is_err());
        let nested = |depth: usize| {
            let mut text = "[".repeat(depth);
            text.push_str(&"]".repeat(depth));
            text
        };
        assert!(parse(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert!(matches!(
            parse(nested(MAX_DEPTH + 1).as_bytes()),
            Err(Error::Json { .. })
        ));
    }

    #[test]
    fn what_the_writer_writes_parses_back() {
        let mut out = String::new();
        let mut writer = ObjectWriter::new(&mut out);
        writer
            .integer("id", -3)
            .number("x", 1.25)
            .string("s", "q\"\\\n\u{1}é");
        writer.array("a", |array| {
            array.object(|object| {
                object.integer("n", 7);
            })
        });
        writer.finish();
        let value = parse(out.as_bytes()).unwrap();
        assert_eq!(value.get("id").and_then(Value::as_number), Some(-3.0));
        assert_eq!(value.get("x").and_then(Value::as_number), Some(1.25));
        assert_eq!(
            value.get("s").and_then(Value::as_str),
            Some("q\"\\\n\u{1}é")
        );
        let Some(Value::Array(items)) = value.get("a") else {
            panic!("no array in {out}");
        };
        assert_eq!(items[0].get("n").and_then(Value::as_number), Some(7.0));
    }
}
