// idemgate in front of your API: the worker and its Durable Object class come from the
// idemgate-edge package; wrangler.jsonc binds them. Configure it there (IDEMGATE_CONFIG,
// ORIGIN_URL or an ORIGIN service binding), not here.
export { default, IdempotencyStore } from "idemgate-edge";
