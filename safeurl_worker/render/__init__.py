"""The rendering sandbox: render one URL in Chromium behind an in-sandbox egress proxy and print
one JSON report (the fetcher's report plus a `render` object).

In the browser image this package is `/app/sandbox/render` next to `/app/sandbox/fetcher`
(`python3 -m sandbox.render URL`); in the worker and tests it is `safeurl_worker.render`, so the
fetcher's modules are imported relatively (`..fetcher`) in both. Needs Playwright and mmh3
(in the image; dev dependencies of the worker). See docs/sandbox.md and docs/fetcher.md.

Modules:
    proxy.EgressProxy        the HTTP/CONNECT proxy applying netcheck to every request
    browse.Renderer          Chromium via Playwright: events, settle, DOM, screenshots, favicon
    report.build             the report within RENDER_MAX_OUTPUT_BYTES
    scan.run(url, env)       one scan; never raises
"""
