"""The bin's web port: the HTTP/JSON API (api.py), the Open Inference Protocol's HTTP routes
(v2.py) and the review page (review.py), one FastAPI app under uvicorn (app.py)."""
