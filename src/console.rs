//! The web console: the static files of `console/` (plain HTML, CSS and JavaScript
//! modules), embedded in the binary and served on the HTTP port under `/console/`.
//!
//! The page calls the same REST API as any client, with the API key the operator
//! enters (kept in the tab's `sessionStorage`), so it holds no rule and no privilege of
//! its own. Each file is served under a name carrying a hash of its content, so it can
//! be cached for a year and a new build is never mixed with an old one; JavaScript
//! imports and the page's references are rewritten to those names when the files are
//! first served. Every response carries a Content-Security-Policy that allows scripts
//! and styles from batchd's own origin only: no inline script, no `eval`, no other host.

use std::io::Write;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, LOCATION, REFERRER_POLICY, VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// Where the console is served; `/` redirects here when the console is on.
pub const PATH: &str = "/console/";

/// The policy of every console response: everything from batchd's own origin only, no
/// inline script or style, no plugins, no framing by other sites, no `<base>` tricks.
/// Trusted Types with no policy: the page's own code can never hand a string to an
/// HTML or script sink (`innerHTML` and the like throw), whatever a future change does.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
     require-trusted-types-for 'script'; trusted-types 'none'";

/// The console's files, in the order they are processed: a JavaScript module comes
/// after every module it imports, so its rewritten imports name hashed files.
const SOURCES: &[(&str, &str)] = &[
    ("console.css", include_str!("../console/console.css")),
    ("favicon.svg", include_str!("../console/favicon.svg")),
    ("dom.js", include_str!("../console/dom.js")),
    ("format.js", include_str!("../console/format.js")),
    ("api.js", include_str!("../console/api.js")),
    ("stream.js", include_str!("../console/stream.js")),
    ("batches.js", include_str!("../console/batches.js")),
    ("batch.js", include_str!("../console/batch.js")),
    ("webhooks.js", include_str!("../console/webhooks.js")),
    ("app.js", include_str!("../console/app.js")),
];

/// The page, which references the files above as `assets/<name>`.
const INDEX: &str = include_str!("../console/index.html");

/// One file, ready to serve in each encoding (each with its own entity tag: the
/// encodings are different representations).
struct Asset {
    content_type: &'static str,
    identity: Encoded,
    gzip: Encoded,
    brotli: Encoded,
}

/// One encoding of a file.
struct Encoded {
    etag: HeaderValue,
    body: Bytes,
}

/// The processed files: the hashed name of each, and the page.
struct Files {
    /// (hashed name, file)
    assets: Vec<(String, Asset)>,
    index: Asset,
}

/// Built once, on the first console request of the process (a process that never
/// serves the console never spends the compression's CPU).
static FILES: OnceCell<Files> = OnceCell::const_new();

/// The processed files; the first call builds them on a blocking thread (brotli at its
/// best quality takes a moment), and every call waits for that one build.
async fn files() -> &'static Files {
    FILES
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| build(SOURCES, INDEX))
                .await
                // `build` only writes to memory and never panics.
                .expect("building the console's files")
        })
        .await
}

/// The console's routes, mergeable into any router of the HTTP port.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { redirect() }))
        .route("/console", get(|| async { redirect() }))
        .route(PATH, get(index))
        .route("/console/assets/{name}", get(asset))
}

fn redirect() -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, PATH)]).into_response()
}

async fn index(headers: HeaderMap) -> Response {
    // The page itself is revalidated on every load (it is small, and it names the
    // hashed files of this build); the files it names never change.
    serve(&files().await.index, &headers, "no-cache")
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match files()
        .await
        .assets
        .iter()
        .find(|(hashed, _)| *hashed == name)
    {
        Some((_, file)) => serve(file, &headers, "public, max-age=31536000, immutable"),
        None => with_security_headers(
            (
                StatusCode::NOT_FOUND,
                [(CONTENT_TYPE, "text/plain; charset=utf-8")],
                "no such console file",
            )
                .into_response(),
        ),
    }
}

fn serve(file: &Asset, headers: &HeaderMap, cache_control: &'static str) -> Response {
    let accepted = headers
        .get(ACCEPT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let (encoding, encoded) = if accepts(accepted, "br") {
        (Some("br"), &file.brotli)
    } else if accepts(accepted, "gzip") {
        (Some("gzip"), &file.gzip)
    } else {
        (None, &file.identity)
    };
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| matches_entity_tag(tags, &encoded.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = (
            StatusCode::OK,
            [(CONTENT_TYPE, file.content_type)],
            encoded.body.clone(),
        )
            .into_response();
        if let Some(encoding) = encoding {
            response
                .headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        response
    };
    let out = response.headers_mut();
    out.insert(ETAG, encoded.etag.clone());
    out.insert(CACHE_CONTROL, HeaderValue::from_static(cache_control));
    out.insert(VARY, HeaderValue::from_static("accept-encoding"));
    with_security_headers(response)
}

/// Whether an `If-None-Match` value names `etag`: `*`, or a list of tags compared
/// weakly (a proxy may have weakened ours to `W/"..."`).
fn matches_entity_tag(if_none_match: &str, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or_default();
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours)
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Whether an `Accept-Encoding` value accepts `coding` (listed, or by `*`, with a
/// quality above zero).
fn accepts(accept_encoding: &str, coding: &str) -> bool {
    let mut star = false;
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or_default().trim();
        // `q=0` refuses; so does a quality that is not a number (`q=nan` included).
        let refused = parts.any(|parameter| {
            let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            name.trim().eq_ignore_ascii_case("q")
                && !value.trim().parse::<f32>().is_ok_and(|q| q > 0.0)
        });
        if name.eq_ignore_ascii_case(coding) {
            return !refused;
        }
        if name == "*" {
            star = !refused;
        }
    }
    star
}

/// Hashes, rewrites and compresses the files: each file's references to the files
/// before it (`./name.js` imports, `assets/name` in the page) become hashed names.
fn build(sources: &[(&str, &str)], index: &str) -> Files {
    let mut assets: Vec<(String, Asset)> = Vec::with_capacity(sources.len());
    let mut renames: Vec<(&str, String)> = Vec::with_capacity(sources.len());
    for &(name, text) in sources {
        let mut text = text.to_owned();
        for (original, hashed) in &renames {
            text = text.replace(&format!("\"./{original}\""), &format!("\"./{hashed}\""));
        }
        let hashed = hashed_name(name, text.as_bytes());
        assets.push((
            hashed.clone(),
            prepare(content_type(name), text.into_bytes()),
        ));
        renames.push((name, hashed));
    }
    let mut page = index.to_owned();
    for (original, hashed) in &renames {
        page = page.replace(
            &format!("\"assets/{original}\""),
            &format!("\"assets/{hashed}\""),
        );
    }
    Files {
        assets,
        index: prepare("text/html; charset=utf-8", page.into_bytes()),
    }
}

/// `app.js` -> `app.<12 hex digits of the SHA-256 of its content>.js`.
fn hashed_name(name: &str, content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    let hash: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    match name.rsplit_once('.') {
        Some((stem, extension)) => format!("{stem}.{hash}.{extension}"),
        None => format!("{name}.{hash}"),
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, extension)| extension) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

fn prepare(content_type: &'static str, identity: Vec<u8>) -> Asset {
    let digest = Sha256::digest(&identity);
    let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let encoded = |body: Vec<u8>, suffix: &str| Encoded {
        // Only hex digits, letters and quotes: always a valid header value.
        etag: HeaderValue::from_str(&format!("\"{tag}{suffix}\""))
            .expect("hex is a valid header value"),
        body: Bytes::from(body),
    };
    Asset {
        content_type,
        gzip: encoded(gzip(&identity), "-gzip"),
        brotli: encoded(brotli(&identity), "-br"),
        identity: encoded(identity, ""),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    encoder.write_all(data).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, 11, 22);
        // Writing to a Vec cannot fail.
        encoder.write_all(data).expect("writing to memory");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn imports_and_the_page_name_the_hashed_files() {
        let files = build(SOURCES, INDEX);
        let names: Vec<&str> = files.assets.iter().map(|(name, _)| name.as_str()).collect();
        let page = String::from_utf8(files.index.identity.body.to_vec()).unwrap();
        for reference in ["console.css", "app.js"] {
            let hashed = names
                .iter()
                .find(|name| name.starts_with(reference.split('.').next().unwrap()))
                .unwrap();
            assert!(page.contains(&format!("\"assets/{hashed}\"")), "{page}");
        }
        // Every relative import of every module names a file that is served.
        for (name, asset) in &files.assets {
            let text = String::from_utf8(asset.identity.body.to_vec()).unwrap();
            for import in text.split("from \"./").skip(1) {
                let target = import.split('"').next().unwrap();
                assert!(
                    names.contains(&target),
                    "{name} imports {target}, not served"
                );
            }
        }
    }

    #[test]
    fn a_changed_file_gets_a_new_name_and_so_does_every_module_importing_it() {
        let sources = [
            ("a.js", "export const a = 1;"),
            ("b.js", "import { a } from \"./a.js\";"),
        ];
        let changed = [
            ("a.js", "export const a = 2;"),
            ("b.js", "import { a } from \"./a.js\";"),
        ];
        let before = build(&sources, "");
        let after = build(&changed, "");
        assert_ne!(before.assets[0].0, after.assets[0].0);
        assert_ne!(before.assets[1].0, after.assets[1].0);
        assert!(before.assets[1].0.starts_with("b.") && before.assets[1].0.ends_with(".js"));
    }

    #[test]
    fn compressed_forms_decode_to_the_file() {
        let files = build(SOURCES, INDEX);
        let every = files
            .assets
            .iter()
            .map(|(_, asset)| asset)
            .chain([&files.index]);
        for asset in every {
            let mut from_gzip = Vec::new();
            flate2::read::GzDecoder::new(asset.gzip.body.as_ref())
                .read_to_end(&mut from_gzip)
                .unwrap();
            assert_eq!(from_gzip, asset.identity.body);
            let mut from_brotli = Vec::new();
            brotli::Decompressor::new(asset.brotli.body.as_ref(), 4096)
                .read_to_end(&mut from_brotli)
                .unwrap();
            assert_eq!(from_brotli, asset.identity.body);
            assert!(asset.brotli.body.len() < asset.identity.body.len());
            assert_ne!(asset.brotli.etag, asset.identity.etag);
            assert_ne!(asset.gzip.etag, asset.identity.etag);
        }
    }

    #[test]
    fn accept_encoding_is_read_with_its_qualities() {
        assert!(accepts("gzip, deflate, br, zstd", "br"));
        assert!(accepts("gzip;q=1.0, br;q=0.5", "br"));
        assert!(!accepts("gzip, br;q=0", "br"));
        assert!(!accepts("gzip", "br"));
        assert!(accepts("*", "br"));
        assert!(!accepts("*, br;q=0", "br"));
        assert!(!accepts("", "gzip"));
        assert!(!accepts("br;Q=0", "br"));
        assert!(!accepts("br;q=nan", "br"));
        assert!(accepts("br;q=0.001", "br"));
    }

    #[test]
    fn if_none_match_is_compared_weakly_over_a_list() {
        let tag = HeaderValue::from_static("\"abc\"");
        assert!(matches_entity_tag("\"abc\"", &tag));
        assert!(matches_entity_tag("W/\"abc\"", &tag));
        assert!(matches_entity_tag("\"x\", W/\"abc\"", &tag));
        assert!(matches_entity_tag("*", &tag));
        assert!(!matches_entity_tag("\"abd\"", &tag));
    }
}
