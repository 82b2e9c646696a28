// The integrity status of one judgment: the server's check and the browser's own.
//
// Only the server can recompute the judgment's leaf from the stored record, because it has the
// payload (or an erased payload's hash) and produces the canonical JSON of its floats.
// GET /v1/judgments/{id}/verification does that and checks the leaf against a signed tree head.
// The browser then checks what needs no trust in that response: the audit path from the leaf to
// the signed root (SHA-256, RFC 6962 hashing) and the head's Ed25519 signature, with WebCrypto.

import { ApiError, getJson } from "./api.js";

function bytes(hex) {
  return new Uint8Array(hex.match(/../g).map((pair) => parseInt(pair, 16)));
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((value) => value.toString(16).padStart(2, "0")).join("");
}

async function sha256(...parts) {
  const joined = new Uint8Array(parts.reduce((length, part) => length + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
}

const LEAF_PREFIX = new Uint8Array([0]);
const NODE_PREFIX = new Uint8Array([1]);

/** Compute the root that an RFC 9162 (section 2.1.3.2) audit path leads to, or null for a path of the wrong shape. */
async function rootFromPath(leaf, index, size, path) {
  if (index >= size) return null;
  let node = index;
  let last = size - 1;
  let computed = leaf;
  for (const sibling of path) {
    if (last === 0) return null;
    if (node % 2 === 1 || node === last) {
      computed = await sha256(NODE_PREFIX, sibling, computed);
      // A last node without a right sibling moves up unchanged.
      while (node % 2 === 0 && node !== 0) {
        node = Math.floor(node / 2);
        last = Math.floor(last / 2);
      }
    } else {
      computed = await sha256(NODE_PREFIX, computed, sibling);
    }
    node = Math.floor(node / 2);
    last = Math.floor(last / 2);
  }
  return last === 0 ? computed : null;
}

async function verifySignature(head, publicKey) {
  const key = await crypto.subtle.importKey("raw", bytes(publicKey.public_key), { name: "Ed25519" }, false,
    ["verify"]);
  // What the server signed: these three fields as JSON with sorted keys and no spaces.
  const signed = JSON.stringify({ root_hash: head.root_hash, timestamp: head.timestamp, tree_size: head.tree_size });
  return crypto.subtle.verify({ name: "Ed25519" }, key, bytes(head.signature), new TextEncoder().encode(signed));
}

/** Check a proof against the head in the browser; return [label, true/false] pairs. */
async function browserChecks(server, proof, head, publicKey) {
  const leaf = await sha256(LEAF_PREFIX, bytes(proof.record_hash));
  const root = await rootFromPath(leaf, proof.leaf_index, head.tree_size, proof.audit_path.map(bytes));
  const keyId = hex(await sha256(bytes(publicKey.public_key)));
  return [
    ["leaf hash = SHA-256(0x00 ‖ record hash), the leaf the server checked",
      hex(leaf) === proof.leaf_hash && proof.leaf_index === server.leaf_index],
    [`audit path leads to the root signed at size ${head.tree_size}`, root !== null && hex(root) === head.root_hash],
    ["tree head signature (Ed25519) verifies with the server's public key",
      keyId === head.key_id && (await verifySignature(head, publicKey))],
  ];
}

function whyNoBrowserCheck() {
  if (!window.isSecureContext || !crypto.subtle) {
    return "this page is not served over HTTPS (or from localhost), so the browser offers no WebCrypto";
  }
  return null;
}

const SERVER_CHECKS = [
  ["record", "leaf recomputed from the stored judgment matches the logged leaf"],
  ["inclusion", "inclusion proof leads to the signed root"],
  ["signature", "tree head signature verifies"],
];

/**
 * Check one judgment against the latest signed tree head.
 *
 * Returns {status: "verified" | "failed" | "pending", reason, checks: [{by, label, ok}], head, leafIndex},
 * where ok is true, false, or null for a check that did not run.
 */
export async function checkIntegrity(judgmentId) {
  const head = await getJson("v1/audit/tree-head");
  const at = head.tree_size > 0 ? { tree_size: head.tree_size } : {};
  const path = `v1/judgments/${encodeURIComponent(judgmentId)}`;
  const [server, publicKey, proof] = await Promise.all([
    getJson(`${path}/verification`, at),
    getJson("v1/audit/public-key"),
    // A judgment without a leaf has no proof, and the server's response gives the reason.
    getJson(`${path}/proof`, at).catch((error) => (error instanceof ApiError && error.status !== 401 ? null : Promise.reject(error))),
  ]);
  const checks = SERVER_CHECKS.map(([name, label]) => ({ by: "server", label, ok: server.checks[name] }));
  const result = { status: server.status, reason: server.reason, checks, head: server.tree_head || head,
    leafIndex: server.leaf_index, erased: server.erased };
  if (server.status === "pending" || proof === null) return result;

  const missing = whyNoBrowserCheck();
  let browser = [];
  if (missing === null) {
    try {
      browser = await browserChecks(server, proof, head, publicKey);
    } catch (error) {
      result.browserNote = `the browser could not run its check (${error.name}: ${error.message})`;
    }
  } else {
    result.browserNote = missing;
  }
  checks.push(...browser.map(([label, ok]) => ({ by: "browser", label, ok })));
  const failed = browser.filter(([, ok]) => !ok).map(([label]) => `browser check failed: ${label}`);
  if (failed.length) {
    result.status = "failed";
    result.reason = [server.reason, ...failed].filter(Boolean).join("; ");
  }
  return result;
}
