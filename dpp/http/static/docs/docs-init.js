// DPP's own start-up for the vendored Swagger UI (not part of swagger-ui-dist).
// A file, not an inline <script>, so /docs runs under `script-src 'self'`.
"use strict";
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    displayRequestDuration: true,
    // no call to the public validator service: the page works offline
    validatorUrl: null,
    // an API key typed into "Authorize" stays in this tab, never in localStorage
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
