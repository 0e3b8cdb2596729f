//! The live monitoring page: one self-contained HTML file (inline CSS and JS, no CDN, no web
//! fonts) that polls `dashboard/data` — relative, so `/dashboard` reads `/dashboard/data` —
//! every 2 s and draws the [`crate::live::DashboardData`] it gets on `<canvas>` charts.
//!
//! The gateway serves [`PAGE`] at `GET /dashboard` with [`CONTENT_TYPE`] and
//! [`CONTENT_SECURITY_POLICY`], and `Live::snapshot` as JSON at `GET /dashboard/data`. When the
//! page is opened as `/dashboard?key=…` it sends `Authorization: Bearer …` on every fetch.

/// The page, embedded at build time.
pub const PAGE: &str = include_str!("../assets/dashboard.html");

/// The `Content-Type` to serve [`PAGE`] with.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// A `Content-Security-Policy` for [`PAGE`]: nothing from elsewhere, fetches only to the same
/// origin, no framing, and only the page's own inline `<script>` and `<style>` run — allowed by
/// their SHA-256 hashes (the test `csp_hashes_match_the_page` says the new values when the page
/// changes).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
    script-src 'sha256-zp5RIxcvySQxhf/LsiJK1aFdqWCs8AUirSfOpOXfl4g='; \
    style-src 'sha256-Ery93BTKYgjKc7azL9eLaexnA3fSoU3dJgngmUE0oMY='; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The path the page polls, relative to the page's own path.
pub const DATA_PATH: &str = "dashboard/data";

/// The labelling page, embedded at build time: one prompt and two replies to it side by side
/// (two choices of one request, or the replies of two requests with the same prompt), for a
/// person to say which is better — `1` / `2` or the buttons, `s` to skip — optionally after
/// editing the better one. It reads its queue from `label/next` below its own path
/// (`GET /dashboard/label/next`, [`crate::feedback::LabelItem`]s) and posts each verdict to its
/// own path (`POST /dashboard/label`). Opened as `/dashboard/label?key=…` it sends
/// `Authorization: Bearer …`. Every piece of data is inserted as text (`textContent`), never as
/// markup: prompts and replies are user data.
pub const LABEL_PAGE: &str = include_str!("../assets/label.html");

/// The `Content-Security-Policy` for [`LABEL_PAGE`], built like [`CONTENT_SECURITY_POLICY`]:
/// its inline `<script>` and `<style>` by their SHA-256 hashes (the test
/// `label_csp_hashes_match_the_page` says the new values when the page changes).
pub const LABEL_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
    script-src 'sha256-rDYs2SeA7A+OQqASxctNYgHV2Z7qWVOiLh9glMQ8Vrc='; \
    style-src 'sha256-jo8Vo4NymUd351ybwye12fcUWSXmbJA8RpYaN79F5zs='; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";
