"""The fake servers' contract checks can fail: a request off Polar's document is caught."""
import httpx

from .fakes.polar_server import TOKEN, FakePolar


def test_polar_fake_flags_requests_off_the_openapi_document():
    fake = FakePolar().start()
    try:
        h = {"Authorization": f"Bearer {TOKEN}", "Polar-Version": "2026-04"}
        httpx.get(f"{fake.url}/v1/events/", params={"bogus": "1", "limit": "500"}, headers=h)
        httpx.post(f"{fake.url}/v1/refunds/", json={"order_id": "x", "amount": 0, "reason": "oops"}, headers=h)
        httpx.get(f"{fake.url}/v1/credits", headers=h)
        httpx.get(f"{fake.url}/v1/orders/", headers={"Authorization": f"Bearer {TOKEN}"})
        text = "\n".join(fake.violations)
        assert "'bogus' is not in the OpenAPI document" in text
        assert "limit=500" in text
        assert "refunds/ body: amount" in text and "reason" in text
        assert "/v1/credits: not an endpoint" in text
        assert "Polar-Version header is None" in text
        r = httpx.get(f"{fake.url}/v1/orders/", headers={"Authorization": "Bearer wrong", "Polar-Version": "2026-04"})
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    finally:
        fake.stop()
