// Calls Route and Generate on a PreMoe server from Node.js, using the proto file (not our Python code).
// Usage: node client.js HOST:PORT PROMPT [MAX_NEW_TOKENS]  -> prints one JSON object.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, prompt, maxNew] = process.argv.slice(2);
if (!target || !prompt) {
  console.error("usage: node client.js HOST:PORT PROMPT [MAX_NEW_TOKENS]");
  process.exit(2);
}
const definition = loader.loadSync(path.join(__dirname, "../../protos/premoe/v1/premoe.proto"), {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const { PreMoe } = grpc.loadPackageDefinition(definition).premoe.v1;
const client = new PreMoe(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 120000);

client.Route({ prompt }, { deadline: deadline() }, (err, route) => {
  if (err) { console.error(err.message); process.exit(1); }
  client.Generate({ prompt, max_new_tokens: Number(maxNew || 8) }, { deadline: deadline() }, (err2, reply) => {
    if (err2) { console.error(err2.message); process.exit(1); }
    client.Generate({ prompt: "" }, { deadline: deadline() }, (err3) => {
      const bad = err3 ? { code: grpc.status[err3.code], details: err3.details } : null;
      console.log(JSON.stringify({ route, reply, bad }));
      client.close();
    });
  });
});
