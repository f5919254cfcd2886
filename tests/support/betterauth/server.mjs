// Test launcher for Better Auth's SCIM 2.0 provider plugin, used by ldap2scim's test harness.
// Environment: PORT (required), SCIM_TOKEN (bearer token), DB (SQLite path, default ":memory:"),
// RATE_LIMIT ("window_seconds:max_requests", optional). Listens on 127.0.0.1 only.
// SCIM base URL: http://127.0.0.1:$PORT/api/auth/scim/v2
import http from "node:http";
import Database from "better-sqlite3";
import { betterAuth } from "better-auth";
import { toNodeHandler } from "better-auth/node";
import { getMigrations } from "better-auth/db/migration";
import { scim } from "@better-auth/scim";

const port = Number(process.env.PORT);
if (!port) throw new Error("PORT is required");
const sqlite = new Database(process.env.DB || ":memory:");
sqlite.pragma("journal_mode = WAL");

let rateLimit = { enabled: false };
if (process.env.RATE_LIMIT) {
  const [window, max] = process.env.RATE_LIMIT.split(":").map(Number);
  rateLimit = { enabled: true, storage: "memory", window, max };
}

const auth = betterAuth({
  baseURL: `http://127.0.0.1:${port}`,
  secret: "ldap2scim-test-harness-secret-0123456789",
  database: sqlite,
  telemetry: { enabled: false },
  rateLimit,
  logger: { level: "error" },
  plugins: [
    scim({
      connections: [{ id: "test", credentials: [{ id: "test", token: process.env.SCIM_TOKEN || "secret" }] }],
    }),
  ],
});

const { runMigrations } = await getMigrations(auth.options);
await runMigrations();

const server = http.createServer(toNodeHandler(auth));
server.listen(port, "127.0.0.1", () => console.log(`ready ${port}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
