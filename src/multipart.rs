//! `multipart/form-data` bodies (RFC 7578), read whole from the buffered request body:
//! zero-copy (every part's data is a slice of the body), bounded (`Limits`), never panicking.
//!
//! What the clients send, each checked against its source and a capture of its bytes:
//!
//! - openai-python (httpx, `httpx/_multipart.py`; `openai/_utils/_utils.py` `extract_files`):
//!   boundary of 32 hex digits, unquoted; text fields first (`Content-Disposition: form-data;
//!   name="prompt"`, no `Content-Type`), then the files in order, each with
//!   `name="..."; filename="..."` and a `Content-Type` line. A list of images is sent as
//!   repeated `image[]` parts, a single image as `image`. `"` in a name or file name is sent as
//!   `%22`, `\` as `\\`.
//! - openai-node (`src/internal/uploads.ts`): `File`s go through the platform `FormData`
//!   (undici: boundary `----formdata-undici-0` and 11 digits); streams through the SDK's own
//!   encoder (boundary `openai-` and base-36 digits). Both put the fields in the order of the
//!   request object, arrays as repeated `image[]`, and give every file part a `Content-Type`.
//! - curl `-F 'image[]=@a.png'`: boundary of dashes and hex digits, the same header layout.
//!
//! All use CRLF line endings, no preamble, and end with `--boundary--` and CRLF; this reader
//! is strict about CRLF and otherwise follows RFC 2046 (preamble and epilogue ignored,
//! transport padding after a boundary allowed).

use std::borrow::Cow;
use std::fmt;

/// RFC 2046: a boundary is 1 to 70 characters.
pub const MAX_BOUNDARY_LEN: usize = 70;

/// How much of a body the reader accepts before refusing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Parts in the body, counting every field and file.
    pub max_parts: usize,
    /// Bytes of one part's header block (without the blank line that ends it).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    /// Room for 16 images, a mask and every text field the API knows, several times over.
    fn default() -> Self {
        Limits { max_parts: 64, max_header_bytes: 4096 }
    }
}

/// One part of the form, in body order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The `name` parameter of `Content-Disposition`, with quoted-string escapes removed and
    /// nothing else decoded (a `%22` stays as sent).
    pub name: Cow<'a, str>,
    /// `filename`, or failing it the raw value of `filename*` (RFC 5987, not decoded): present
    /// for file parts. Never to be trusted or echoed as is.
    pub filename: Option<Cow<'a, str>>,
    /// The part's `Content-Type` as sent (not to be trusted for the data's type).
    pub content_type: Option<&'a str>,
    pub data: &'a [u8],
}

impl<'a> Part<'a> {
    /// Whether the part is a file (it has a file name), as the SDKs send every upload.
    pub fn is_file(&self) -> bool {
        self.filename.is_some()
    }

    /// The data as text, if it is UTF-8.
    pub fn text(&self) -> Option<&'a str> {
        std::str::from_utf8(self.data).ok()
    }
}

/// Why a content type or body was refused. The message is short and never quotes the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultipartError {
    NotFormData,
    MalformedContentType,
    MissingBoundary,
    InvalidBoundary,
    NoOpeningBoundary,
    MalformedBoundaryLine,
    MissingClosingBoundary,
    TooManyParts(usize),
    HeadersTooLarge(usize),
    MalformedHeader,
    DuplicateHeader,
    MissingContentDisposition,
    NotFormDataPart,
    MalformedDisposition,
    MissingName,
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MultipartError::*;
        match self {
            NotFormData => f.write_str("the content type is not multipart/form-data"),
            MalformedContentType => f.write_str("the multipart/form-data content type cannot be read"),
            MissingBoundary => f.write_str("the multipart/form-data content type has no boundary"),
            InvalidBoundary => f.write_str("the multipart boundary is not 1 to 70 characters allowed by RFC 2046"),
            NoOpeningBoundary => f.write_str("the body does not contain the multipart boundary"),
            MalformedBoundaryLine => f.write_str("a multipart boundary line has bytes after the boundary"),
            MissingClosingBoundary => f.write_str("the multipart body ends before its closing boundary"),
            TooManyParts(max) => write!(f, "the multipart body has more than {max} parts"),
            HeadersTooLarge(max) => write!(f, "a multipart part has more than {max} bytes of headers"),
            MalformedHeader => f.write_str("a multipart part has a header that cannot be read"),
            DuplicateHeader => f.write_str("a multipart part repeats a header"),
            MissingContentDisposition => f.write_str("a multipart part has no Content-Disposition header"),
            NotFormDataPart => f.write_str("a multipart part's Content-Disposition is not form-data"),
            MalformedDisposition => f.write_str("a multipart part's Content-Disposition cannot be read"),
            MissingName => f.write_str("a multipart part has no name"),
        }
    }
}

impl std::error::Error for MultipartError {}

/// The boundary of a `multipart/form-data; boundary=...` content type (media type and
/// parameter names in any case, the value quoted or not), checked against RFC 2046.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let split = content_type.find(';').unwrap_or(content_type.len());
    let (media, mut rest) = content_type.split_at_checked(split).unwrap_or((content_type, ""));
    if !same(trim(media), "multipart/form-data") {
        return Err(MultipartError::NotFormData);
    }
    let mut found = None;
    while let Some((name, value)) = next_param(&mut rest).ok_or(MultipartError::MalformedContentType)? {
        if same(name, "boundary") {
            if found.is_some() {
                return Err(MultipartError::MalformedContentType);
            }
            found = Some(value);
        }
    }
    let found = found.ok_or(MultipartError::MissingBoundary)?;
    check_boundary(&found)?;
    Ok(found.into_owned())
}

/// The parts of `body`, in order. The boundary is checked as `boundary()` does.
pub fn parse<'a>(body: &'a [u8], boundary: &str, limits: &Limits) -> Result<Vec<Part<'a>>, MultipartError> {
    check_boundary(boundary)?;
    let b = boundary.as_bytes();
    // `pos` is always where a "--boundary" starts.
    let mut pos = if is_dash_boundary(body, 0, b) {
        0
    } else {
        find_delimiter(body, 0, b).ok_or(MultipartError::NoOpeningBoundary)?.saturating_add(2)
    };
    let mut parts = Vec::new();
    loop {
        let after = pos.saturating_add(2).saturating_add(b.len());
        let rest = body.get(after..).unwrap_or_default();
        if rest.starts_with(b"--") {
            return Ok(parts); // the close delimiter; what follows is the epilogue
        }
        let padding = rest.iter().take_while(|&&c| is_ows(c)).count();
        let line_end = rest.get(padding..).unwrap_or_default();
        if !line_end.starts_with(b"\r\n") {
            return Err(if line_end.len() < 2 {
                MultipartError::MissingClosingBoundary
            } else {
                MultipartError::MalformedBoundaryLine
            });
        }
        if parts.len() >= limits.max_parts {
            return Err(MultipartError::TooManyParts(limits.max_parts));
        }
        let head_start = after.saturating_add(padding).saturating_add(2);
        let (head, data_start) = header_block(body, head_start, limits.max_header_bytes)?;
        let data_end = find_delimiter(body, data_start, b).ok_or(MultipartError::MissingClosingBoundary)?;
        let data = body.get(data_start..data_end).ok_or(MultipartError::MissingClosingBoundary)?;
        parts.push(read_part(head, data)?);
        pos = data_end.saturating_add(2);
    }
}

/// RFC 2046 `bchars`, not ending in a space.
fn check_boundary(boundary: &str) -> Result<(), MultipartError> {
    let ok = (1..=MAX_BOUNDARY_LEN).contains(&boundary.len())
        && !boundary.ends_with(' ')
        && boundary.bytes().all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(MultipartError::InvalidBoundary)
    }
}

fn is_dash_boundary(body: &[u8], at: usize, boundary: &[u8]) -> bool {
    body.get(at..).is_some_and(|s| s.starts_with(b"--") && s.get(2..).is_some_and(|s| s.starts_with(boundary)))
}

/// Where the next CRLF "--boundary" starts, from `from` on. Linear: the boundary holds no CR,
/// so a partial match never overlaps the next candidate.
fn find_delimiter(body: &[u8], from: usize, boundary: &[u8]) -> Option<usize> {
    let mut i = from;
    while let Some(offset) = body.get(i..)?.iter().position(|&c| c == b'\r') {
        let at = i.saturating_add(offset);
        if body.get(at.saturating_add(1)) == Some(&b'\n') && is_dash_boundary(body, at.saturating_add(2), boundary) {
            return Some(at);
        }
        i = at.saturating_add(1);
    }
    None
}

/// The header block that starts at `start` (without the blank line that ends it), and where
/// the part's data starts.
fn header_block(body: &[u8], start: usize, max: usize) -> Result<(&[u8], usize), MultipartError> {
    let rest = body.get(start..).unwrap_or_default();
    if rest.starts_with(b"\r\n") {
        return Ok((&[], start.saturating_add(2))); // no headers at all
    }
    let window = rest.get(..max.saturating_add(4)).unwrap_or(rest);
    match window.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => Ok((window.get(..end).unwrap_or_default(), start.saturating_add(end).saturating_add(4))),
        None if window.len() < rest.len() => Err(MultipartError::HeadersTooLarge(max)),
        None => Err(MultipartError::MissingClosingBoundary),
    }
}

fn read_part<'a>(head: &'a [u8], data: &'a [u8]) -> Result<Part<'a>, MultipartError> {
    let mut disposition = None;
    let mut content_type = None;
    let mut rest = head;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(rest.len());
        let (line, tail) = rest.split_at_checked(end).unwrap_or((rest, &[]));
        rest = tail.get(2..).unwrap_or_default();
        if line.iter().any(|&c| c == b'\r' || c == b'\n') || line.first().is_some_and(|&c| is_ows(c)) {
            return Err(MultipartError::MalformedHeader); // a bare CR or LF, or an obsolete folded line
        }
        let line = std::str::from_utf8(line).map_err(|_| MultipartError::MalformedHeader)?;
        let colon = line.bytes().position(|c| c == b':').ok_or(MultipartError::MalformedHeader)?;
        let (name, value) = line.split_at_checked(colon).ok_or(MultipartError::MalformedHeader)?;
        let value = value.get(1..).unwrap_or_default();
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(MultipartError::MalformedHeader);
        }
        let value = trim(value);
        let slot = if same(name, "content-disposition") {
            &mut disposition
        } else if same(name, "content-type") {
            &mut content_type
        } else {
            continue; // Content-Transfer-Encoding and the like: RFC 7578 has no use for them
        };
        if slot.replace(value).is_some() {
            return Err(MultipartError::DuplicateHeader);
        }
    }
    let disposition = disposition.ok_or(MultipartError::MissingContentDisposition)?;
    let split = disposition.find(';').unwrap_or(disposition.len());
    let (kind, mut rest) = disposition.split_at_checked(split).unwrap_or((disposition, ""));
    if !same(trim(kind), "form-data") {
        return Err(MultipartError::NotFormDataPart);
    }
    let (mut name, mut filename, mut filename_ext) = (None, None, None);
    while let Some((key, value)) = next_param(&mut rest).ok_or(MultipartError::MalformedDisposition)? {
        let slot = if same(key, "name") {
            &mut name
        } else if same(key, "filename") {
            &mut filename
        } else if same(key, "filename*") {
            &mut filename_ext
        } else {
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(MultipartError::MalformedDisposition);
        }
    }
    let name = name.filter(|n| !n.is_empty()).ok_or(MultipartError::MissingName)?;
    Ok(Part { name, filename: filename.or(filename_ext), content_type, data })
}

/// ASCII case-insensitive equality, kept out of line: inlined, each call with a constant
/// unrolls into a long run of compares.
#[inline(never)]
fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn is_ows(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

/// `s` without leading spaces and tabs (byte-wise: smaller in wasm than a `char` pattern).
fn trim_start(s: &str) -> &str {
    s.get(s.bytes().take_while(|&c| is_ows(c)).count()..).unwrap_or_default()
}

/// `s` without leading or trailing spaces and tabs.
fn trim(s: &str) -> &str {
    let s = trim_start(s);
    s.get(..s.bytes().rposition(|c| !is_ows(c)).map_or(0, |i| i + 1)).unwrap_or_default()
}

/// RFC 9110 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The next `; name=value` parameter of `rest`, moving past it: `Some(None)` at the end,
/// `None` when the syntax is wrong. A value is a quoted string (escapes removed) or the bytes
/// up to the next `;` or space (more lenient than a token: unquoted boundaries hold `=` and
/// `/`, and names `[]`). Empty parameters (`;;`, a trailing `;`) are skipped.
fn next_param<'a>(rest: &mut &'a str) -> Option<Option<(&'a str, Cow<'a, str>)>> {
    loop {
        let s = trim_start(rest);
        if s.is_empty() {
            *rest = s;
            return Some(None);
        }
        let s = trim_start(s.strip_prefix(';')?);
        if s.is_empty() || s.starts_with(';') {
            *rest = s;
            continue;
        }
        let name_len = s.bytes().take_while(|&c| is_tchar(c)).count();
        let (name, s) = s.split_at_checked(name_len)?;
        if name.is_empty() {
            return None;
        }
        let s = trim_start(trim_start(s).strip_prefix('=')?);
        let (value, s) = match s.strip_prefix('"') {
            Some(quoted) => quoted_string(quoted)?,
            None => {
                let len = s.bytes().position(|c| c == b';' || c == b'"' || is_ows(c)).unwrap_or(s.len());
                let (value, s) = s.split_at_checked(len)?;
                if value.is_empty() {
                    return None;
                }
                (Cow::Borrowed(value), s)
            }
        };
        *rest = s;
        return Some(Some((name, value)));
    }
}

/// A quoted string's content (after the opening quote) with `\x` read as `x`, and what
/// follows the closing quote; `None` if it never closes.
fn quoted_string(s: &str) -> Option<(Cow<'_, str>, &str)> {
    let bytes = s.as_bytes();
    let mut i = 0usize;
    let mut escaped = false;
    loop {
        match bytes.get(i)? {
            b'"' => break,
            b'\\' => {
                escaped = true;
                i = i.saturating_add(2);
            }
            _ => i = i.saturating_add(1),
        }
    }
    // A quote is ASCII, so `i` is a character boundary.
    let (inner, rest) = (s.get(..i)?, s.get(i.saturating_add(1)..)?);
    if !escaped {
        return Some((Cow::Borrowed(inner), rest));
    }
    // Byte-wise: dropping an ASCII backslash from UTF-8 leaves UTF-8.
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.bytes();
    while let Some(c) = bytes.next() {
        out.extend(if c == b'\\' { bytes.next() } else { Some(c) });
    }
    Some((Cow::Owned(String::from_utf8(out).ok()?), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\nAAAA";

    fn parts<'a>(body: &'a [u8], boundary: &str) -> Vec<Part<'a>> {
        parse(body, boundary, &Limits::default()).unwrap()
    }

    fn err(body: &[u8], boundary: &str) -> MultipartError {
        parse(body, boundary, &Limits::default()).unwrap_err()
    }

    fn file<'a>(name: &'a str, filename: &'a str, content_type: &'a str, data: &'a [u8]) -> Part<'a> {
        Part { name: name.into(), filename: Some(filename.into()), content_type: Some(content_type), data }
    }

    fn field<'a>(name: &'a str, data: &'a [u8]) -> Part<'a> {
        Part { name: name.into(), filename: None, content_type: None, data }
    }

    /// `client.images.edit(image=[("a.png", ...), ("b.png", ...)], mask=("m.png", ...),
    /// prompt="a cat", n=2, size="1024x1024")`, as openai-python 3.57.0 (httpx2 2.16.2)
    /// sends it, captured byte for byte (only the boundary differs between runs).
    const PYTHON_EDIT: &[u8] = b"--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"n\"\r\n\r\n2\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"size\"\r\n\r\n1024x1024\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAAAA\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"b.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAAAAB\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da\r\n\
Content-Disposition: form-data; name=\"mask\"; filename=\"m.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAAAA\r\n\
--70b4ca8d53643ea7be3b1a79d77bc5da--\r\n";

    #[test]
    fn python_sdk_edit_with_several_images() {
        let ct = "multipart/form-data; boundary=70b4ca8d53643ea7be3b1a79d77bc5da";
        let b = boundary(ct).unwrap();
        assert_eq!(
            parts(PYTHON_EDIT, &b),
            vec![
                field("prompt", b"a cat"),
                field("n", b"2"),
                field("size", b"1024x1024"),
                file("image[]", "a.png", "image/png", PNG),
                file("image[]", "b.png", "image/png", b"\x89PNG\r\n\x1a\nAAAAB"),
                file("mask", "m.png", "image/png", PNG),
            ]
        );
        let p = parts(PYTHON_EDIT, &b);
        assert!(p[3].is_file() && !p[0].is_file());
        assert_eq!(p[0].text(), Some("a cat"));
        assert!(matches!(p[3].name, Cow::Borrowed(_)), "zero-copy when nothing is escaped");
    }

    #[test]
    fn python_sdk_single_image_and_bare_bytes() {
        // image=("a.png", bytes, "image/png"): the name is `image`, not `image[]`.
        let body = b"--c3d3ab23f93fed132f86cbbe808d17d6\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\none\r\n\
--c3d3ab23f93fed132f86cbbe808d17d6\r\n\
Content-Disposition: form-data; name=\"model\"\r\n\r\ngemini\r\n\
--c3d3ab23f93fed132f86cbbe808d17d6\r\n\
Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAAAA\r\n\
--c3d3ab23f93fed132f86cbbe808d17d6--\r\n";
        let p = parts(body, "c3d3ab23f93fed132f86cbbe808d17d6");
        assert_eq!(p[2], file("image", "a.png", "image/png", PNG));
        // image=b"..." (bare bytes): httpx names the file "upload" and guesses nothing.
        let body = b"--6c71f78374b52b2a5cd388a0b392a61c\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\nraw bytes\r\n\
--6c71f78374b52b2a5cd388a0b392a61c\r\n\
Content-Disposition: form-data; name=\"image\"; filename=\"upload\"\r\nContent-Type: application/octet-stream\r\n\r\n\
\x89PNG\r\n\x1a\nAAAA\r\n\
--6c71f78374b52b2a5cd388a0b392a61c--\r\n";
        let p = parts(body, "6c71f78374b52b2a5cd388a0b392a61c");
        assert_eq!(p[1], file("image", "upload", "application/octet-stream", PNG));
        // A file name with a quote: httpx sends %22, which is kept as sent.
        let body = b"--cfb5\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"x y%22q.png\"\r\n\
Content-Type: image/png\r\n\r\nX\r\n--cfb5--\r\n";
        assert_eq!(parts(body, "cfb5")[0].filename.as_deref(), Some("x y%22q.png"));
    }

    /// openai-node with `toFile()` / `File`s: the platform FormData, serialized by undici
    /// (Node 20), fields in the order of the request object, arrays as `image[]`.
    #[test]
    fn node_sdk_form_data() {
        let ct = "multipart/form-data; boundary=----formdata-undici-009714763470";
        let b = boundary(ct).unwrap();
        assert_eq!(b, "----formdata-undici-009714763470");
        let body = b"------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"b%22q.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"mask\"; filename=\"m.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n\
------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"n\"\r\n\r\n2\r\n\
------formdata-undici-009714763470\r\n\
Content-Disposition: form-data; name=\"raw\"; filename=\"unknown_file\"\r\nContent-Type: application/octet-stream\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
------formdata-undici-009714763470--\r\n";
        let p = parts(body, &b);
        let names: Vec<&str> = p.iter().map(|p| p.name.as_ref()).collect();
        assert_eq!(names, ["image[]", "image[]", "mask", "prompt", "n", "raw"]);
        assert_eq!(p[1], file("image[]", "b%22q.png", "image/png", b"\x89PNG\r\n\x1a\nAA"));
        assert_eq!(p[3], field("prompt", b"a cat"));
        assert_eq!(p[5].filename.as_deref(), Some("unknown_file"));
    }

    /// openai-node with a stream (`fs.createReadStream`): the SDK's own encoder.
    #[test]
    fn node_sdk_streaming_encoder() {
        let ct = "multipart/form-data; boundary=openai-k3j5x9q2m1";
        let body = b"--openai-k3j5x9q2m1\r\n\
Content-Disposition: form-data; name=\"image\"; filename=\"otter.png\"\r\nContent-Type: application/octet-stream\r\n\r\n\
\x89PNG\r\n\x1a\nAAAA\r\n\
--openai-k3j5x9q2m1\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\nA cute baby sea otter\r\n\
--openai-k3j5x9q2m1--\r\n";
        let p = parts(body, &boundary(ct).unwrap());
        assert_eq!(p[0], file("image", "otter.png", "application/octet-stream", PNG));
        assert_eq!(p[1], field("prompt", b"A cute baby sea otter"));
    }

    /// `curl -F 'image[]=@a.png' -F 'image[]=@b.png' -F mask=@a.png -F prompt='a cat' -F n=2`
    /// (curl 7.88.1), captured.
    #[test]
    fn curl_form() {
        let ct = "multipart/form-data; boundary=------------------------b6484cec2970caa4";
        let body = b"--------------------------b6484cec2970caa4\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
--------------------------b6484cec2970caa4\r\n\
Content-Disposition: form-data; name=\"image[]\"; filename=\"b.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
--------------------------b6484cec2970caa4\r\n\
Content-Disposition: form-data; name=\"mask\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\
\x89PNG\r\n\x1a\nAA\r\n\
--------------------------b6484cec2970caa4\r\n\
Content-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n\
--------------------------b6484cec2970caa4\r\n\
Content-Disposition: form-data; name=\"n\"\r\n\r\n2\r\n\
--------------------------b6484cec2970caa4--\r\n";
        let p = parts(body, &boundary(ct).unwrap());
        assert_eq!(p.len(), 5);
        assert_eq!(p[1], file("image[]", "b.png", "image/png", b"\x89PNG\r\n\x1a\nAA"));
        assert_eq!(p[4], field("n", b"2"));
    }

    #[test]
    fn boundaries_from_content_types() {
        assert_eq!(boundary("multipart/form-data; boundary=abc").unwrap(), "abc");
        assert_eq!(boundary("Multipart/Form-Data;BOUNDARY=\"a b:c\"").unwrap(), "a b:c");
        assert_eq!(
            boundary("multipart/form-data; charset=utf-8; boundary=\"x\\\"y\"").unwrap_err(),
            MultipartError::InvalidBoundary
        );
        assert_eq!(boundary("multipart/form-data; boundary=----=_Part_0_1.2").unwrap(), "----=_Part_0_1.2");
        assert_eq!(boundary("multipart/form-data; boundary=abc;").unwrap(), "abc");
        assert_eq!(boundary(" multipart/form-data ; boundary = abc ").unwrap(), "abc");
        assert_eq!(boundary(&format!("multipart/form-data; boundary={}", "b".repeat(70))).unwrap().len(), 70);

        use MultipartError::*;
        assert_eq!(boundary("application/json").unwrap_err(), NotFormData);
        assert_eq!(boundary("multipart/mixed; boundary=abc").unwrap_err(), NotFormData);
        assert_eq!(boundary("multipart/form-data").unwrap_err(), MissingBoundary);
        assert_eq!(boundary("multipart/form-data; charset=utf-8").unwrap_err(), MissingBoundary);
        assert_eq!(boundary("multipart/form-data; boundary=").unwrap_err(), MalformedContentType);
        assert_eq!(boundary("multipart/form-data; boundary=\"\"").unwrap_err(), InvalidBoundary);
        assert_eq!(boundary("multipart/form-data; boundary=\"abc").unwrap_err(), MalformedContentType);
        assert_eq!(boundary("multipart/form-data; boundary=a; boundary=b").unwrap_err(), MalformedContentType);
        assert_eq!(boundary("multipart/form-data; boundary=a b").unwrap_err(), MalformedContentType);
        assert_eq!(boundary("multipart/form-data boundary=a").unwrap_err(), NotFormData);
        assert_eq!(boundary("multipart/form-data; boundary=\"abc \"").unwrap_err(), InvalidBoundary);
        assert_eq!(boundary("multipart/form-data; boundary=a\u{e9}").unwrap_err(), InvalidBoundary);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "b".repeat(71))).unwrap_err(),
            InvalidBoundary
        );
    }

    #[test]
    fn dispositions_with_quotes_semicolons_and_extended_names() {
        let body = b"--X\r\n\
content-disposition: FORM-DATA ; name=\"we\\\"ird;name\" ; filename=\"a;b.png\"\r\n\
CONTENT-TYPE:image/png\r\n\
X-Other: ignored\r\n\r\n\
data\r\n\
--X\r\n\
Content-Disposition: form-data; name=mask; filename*=UTF-8''m%C3%A4sk.png\r\n\r\n\
m\r\n\
--X\r\n\
Content-Disposition: form-data; name=\"image\"; filename=\"\"\r\n\r\n\
\r\n\
--X--";
        let p = parts(body, "X");
        assert_eq!(p[0].name, "we\"ird;name");
        assert!(matches!(p[0].name, Cow::Owned(_)));
        assert_eq!(p[0].filename.as_deref(), Some("a;b.png"));
        assert_eq!(p[0].content_type, Some("image/png"));
        assert_eq!(p[0].data, b"data");
        assert_eq!(p[1].name, "mask");
        assert_eq!(p[1].filename.as_deref(), Some("UTF-8''m%C3%A4sk.png"));
        assert_eq!(p[1].content_type, None);
        assert!(p[2].is_file(), "an empty file name still makes a file part");
        assert_eq!(p[2].data, b"", "an empty file");
    }

    #[test]
    fn preamble_epilogue_padding_and_empty_forms() {
        let body = b"This is the preamble.\r\n--X  \t\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--X--\r\nepilogue\r\n--X\r\n";
        assert_eq!(parts(body, "X"), vec![field("a", b"1")]);
        assert_eq!(parts(b"--X--\r\n", "X"), vec![]);
        // Data may hold CRLFs, dashes and the boundary not at a line start.
        let body = b"--X\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\r\n--Y\r\n-X--X\r\n\r\n--X--";
        assert_eq!(parts(body, "X")[0].data, b"\r\n--Y\r\n-X--X\r\n");
    }

    #[test]
    fn malformed_bodies() {
        use MultipartError::*;
        let cd = "Content-Disposition: form-data; name=\"a\"";
        let with = |s: &str| s.replace("CD", cd).into_bytes();
        assert_eq!(err(b"{\"prompt\": \"a cat\"}", "X"), NoOpeningBoundary);
        assert_eq!(err(b"", "X"), NoOpeningBoundary);
        assert_eq!(err(b"--Y\r\n", "X"), NoOpeningBoundary);
        assert_eq!(err(&with("--X\r\nCD\r\n\r\n1\r\n"), "X"), MissingClosingBoundary);
        assert_eq!(err(&with("--X\r\nCD\r\n\r\n1\r\n--X"), "X"), MissingClosingBoundary);
        assert_eq!(err(&with("--X\r\nCD\r\n\r\n1\r\n--X\r"), "X"), MissingClosingBoundary);
        assert_eq!(err(&with("--X\r\nCD\r\n"), "X"), MissingClosingBoundary);
        assert_eq!(err(b"--X", "X"), MissingClosingBoundary);
        assert_eq!(err(&with("--Xjunk\r\nCD\r\n\r\n1\r\n--X--"), "X"), MalformedBoundaryLine);
        assert_eq!(err(&with("--X\r\nCD\r\n\r\n1\r\n--XY\r\nCD\r\n\r\n2\r\n--X--"), "X"), MalformedBoundaryLine);
        assert_eq!(err(b"--X\r\n\r\n1\r\n--X--", "X"), MissingContentDisposition);
        assert_eq!(err(b"--X\r\nContent-Type: text/plain\r\n\r\n1\r\n--X--", "X"), MissingContentDisposition);
        assert_eq!(err(b"--X\r\nContent-Disposition: form-data\r\n\r\n1\r\n--X--", "X"), MissingName);
        assert_eq!(
            err(b"--X\r\nContent-Disposition: form-data; filename=\"a.png\"\r\n\r\n1\r\n--X--", "X"),
            MissingName
        );
        assert_eq!(err(b"--X\r\nContent-Disposition: form-data; name=\"\"\r\n\r\n1\r\n--X--", "X"), MissingName);
        assert_eq!(err(b"--X\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\n1\r\n--X--", "X"), NotFormDataPart);
        assert_eq!(
            err(b"--X\r\nContent-Disposition: form-data; name=\"a\r\n\r\n1\r\n--X--", "X"),
            MalformedDisposition
        );
        assert_eq!(
            err(b"--X\r\nContent-Disposition: form-data; name=a; name=b\r\n\r\n1\r\n--X--", "X"),
            MalformedDisposition
        );
        assert_eq!(
            err(b"--X\r\nContent-Disposition: form-data; name=\"a\" junk\r\n\r\n1\r\n--X--", "X"),
            MalformedDisposition
        );
        assert_eq!(err(&with("--X\r\nCD\r\nCD\r\n\r\n1\r\n--X--"), "X"), DuplicateHeader);
        assert_eq!(
            err(&with("--X\r\nCD\r\nContent-Type: a\r\ncontent-type: b\r\n\r\n1\r\n--X--"), "X"),
            DuplicateHeader
        );
        assert_eq!(err(&with("--X\r\nCD\r\nno colon\r\n\r\n1\r\n--X--"), "X"), MalformedHeader);
        assert_eq!(err(&with("--X\r\nCD\r\n folded\r\n\r\n1\r\n--X--"), "X"), MalformedHeader);
        assert_eq!(err(&with("--X\r\nCD\nContent-Type: a\r\n\r\n1\r\n--X--"), "X"), MalformedHeader);
        assert_eq!(err(&with("--X\r\nCD\rContent-Type: a\r\n\r\n1\r\n--X--"), "X"), MalformedHeader);
        assert_eq!(err(&with("--X\r\nBad Name: a\r\nCD\r\n\r\n1\r\n--X--"), "X"), MalformedHeader);
        assert_eq!(
            err(b"--X\r\nContent-Disposition: form-data; name=\"\xff\"\r\n\r\n1\r\n--X--", "X"),
            MalformedHeader
        );
        // Bare LF line endings: the boundary line does not end in CRLF.
        assert_eq!(err(b"--X\nContent-Disposition: form-data; name=\"a\"\n\n1\n--X--\n", "X"), MalformedBoundaryLine);
        assert_eq!(err(b"--X--", "bad\rboundary"), InvalidBoundary);
        assert_eq!(err(b"--X--", ""), InvalidBoundary);
    }

    #[test]
    fn limits_are_kept() {
        let one = "--X\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n";
        let body = format!("{}--X--", one.repeat(3));
        let limits = |max_parts, max_header_bytes| Limits { max_parts, max_header_bytes };
        assert_eq!(parse(body.as_bytes(), "X", &limits(3, 100)).unwrap().len(), 3);
        assert_eq!(parse(body.as_bytes(), "X", &limits(2, 100)).unwrap_err(), MultipartError::TooManyParts(2));
        assert_eq!(parse(body.as_bytes(), "X", &limits(0, 100)).unwrap_err(), MultipartError::TooManyParts(0));
        let header = "Content-Disposition: form-data; name=\"a\"";
        assert_eq!(parse(body.as_bytes(), "X", &limits(3, header.len())).unwrap().len(), 3);
        assert_eq!(
            parse(body.as_bytes(), "X", &limits(3, header.len() - 1)).unwrap_err(),
            MultipartError::HeadersTooLarge(header.len() - 1)
        );
        // A header block that never ends: refused at the limit, not read to the end.
        let endless = format!("--X\r\n{header}\r\n{}", "X-Pad: 1\r\n".repeat(10_000));
        assert_eq!(
            parse(endless.as_bytes(), "X", &limits(3, 4096)).unwrap_err(),
            MultipartError::HeadersTooLarge(4096)
        );
        // Messages are short and name no content.
        for e in [MultipartError::TooManyParts(2), MultipartError::MalformedHeader, MultipartError::NoOpeningBoundary] {
            let m = e.to_string();
            assert!(!m.is_empty() && m.len() < 80 && !m.contains('"'), "{m}");
        }
    }

    #[test]
    fn adversarial_bodies_stay_linear() {
        // Near-misses of the delimiter everywhere: one pass, no quadratic rescans.
        let boundary = "b".repeat(70);
        let near = format!("\r\n--{}", &boundary[..69]);
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n{}\r\n--{boundary}--",
            near.repeat(20_000)
        );
        let p = parse(body.as_bytes(), &boundary, &Limits::default()).unwrap();
        assert_eq!(p[0].data.len(), near.len() * 20_000);
        let crs = "\r".repeat(200_000);
        assert_eq!(parse(crs.as_bytes(), "X", &Limits::default()).unwrap_err(), MultipartError::NoOpeningBoundary);
    }
}
