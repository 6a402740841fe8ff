"""Tenancy: who may call DPP, and how often.

``principal`` holds the records, errors and validators (pure); ``service`` the
plans, tenants and API keys in Postgres and the authentication of a request's
key; ``auth_cache`` the per-replica cache of those answers, kept honest by
Redis pub/sub; ``keys`` the key format (pure); ``ratelimit`` the per-tenant
and per-key GCRA limits in Redis.
"""
