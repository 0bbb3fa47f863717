-- Argo CD health check for ota.sealed-ota.dev/UpdateCampaign.
--
-- Argo CD runs this (gopher-lua, Lua 5.1) with `obj` set to the live object and expects a table
-- {status = "Healthy" | "Progressing" | "Degraded" | "Suspended", message = "..."}.
-- It reads what the operator writes: status.phase, status.observedGeneration, status.progress and
-- the Ready condition (reason and message). e2e/tests/chart_gitops.rs runs it against sample statuses.
--
--   Succeeded                          -> Healthy    (every selected device runs the target)
--   Completed                          -> Degraded   (finished, some devices failed: DevicesFailed)
--   Failed, Aborted                    -> Degraded   (a new campaign is needed)
--   Paused                             -> Suspended  (spec.paused; resume by setting it false)
--   Paused, Ready reason GateFailed    -> Degraded   (a gate between waves failed: a person decides)
--   Planned                            -> Suspended  (spec.dryRun: status.plan shows the plan)
--   Pending/Progressing, Ready reason
--     that needs a person to act       -> Degraded   (missing or invalid Secret, payload, selector...)
--   anything else, or a status older
--     than metadata.generation         -> Progressing
local hs = { status = "Progressing", message = "Waiting for the Sealed OTA operator to report status" }

-- Ready=False reasons that only a change by a person fixes (BlockerReason in
-- operator/src/reasons.rs; e2e/tests/chart_gitops.rs checks every one is classified here).
-- BrokerUnavailable, FirmwareDownloadFailed, NoDevicesSelected and Progressing are transient.
local needs_person = {
  InvalidSelector = true,
  InvalidRollout = true,
  ManagerSecretMissing = true,
  ManagerSecretInvalid = true,
  CaSecretMissing = true,
  CaSecretInvalid = true,
  FirmwareUnreadable = true,
  FirmwareDigestMismatch = true,
  ReleaseSignatureInvalid = true,
  PayloadMissing = true,
  PayloadInvalid = true,
  OciReferenceInvalid = true,
  PullSecretInvalid = true,
  RegistryAuthFailed = true,
  InvalidSchedule = true,
  WindowNeverOpens = true,
}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function with_progress(status, text)
  if status.progress ~= nil and status.progress ~= "" then
    return text .. " (" .. status.progress .. " devices finished)"
  end
  return text
end

if obj.status == nil or obj.status.phase == nil then
  return hs
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
local ready_message = ""
if ready ~= nil and ready.message ~= nil then
  ready_message = ready.message
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = ready_message ~= "" and ready_message or with_progress(status, "Campaign succeeded")
elseif status.phase == "Completed" then
  hs.status = "Degraded"
  hs.message = ready_message ~= "" and ready_message or with_progress(status, "Campaign completed with failed devices")
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = ready_message ~= "" and ready_message or with_progress(status, "Campaign failed")
elseif status.phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = ready_message ~= "" and ready_message or "Campaign aborted (spec.abort)"
elseif status.phase == "Paused" and ready ~= nil and ready.reason == "GateFailed" then
  hs.status = "Degraded"
  hs.message = "GateFailed: " .. ready_message
elseif status.phase == "Paused" then
  hs.status = "Suspended"
  hs.message = with_progress(status, "Campaign paused (spec.paused)")
elseif status.phase == "Planned" then
  hs.status = "Suspended"
  hs.message = "Dry run (spec.dryRun): status.plan shows what the campaign would do"
elseif ready ~= nil and ready.status == "False" and needs_person[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. ready_message
else
  hs.status = "Progressing"
  if ready_message ~= "" then
    hs.message = with_progress(status, ready_message)
  else
    hs.message = with_progress(status, "Campaign " .. status.phase)
  end
end
return hs
